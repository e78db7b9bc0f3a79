"""The prepared accelerator run (benchmarks/device_run.sh) at its quick CPU sizes: every
step runs and reports, so the accelerator run cannot fail on a typo. Timings are not
checked; statuses, structure and the budget's clean stop are."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import device_run  # noqa: E402

STEPS = [name for name, _ in device_run.STEPS]


def test_quick_run_completes_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "device_run.sh"), "--quick", "--budget", "900"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "device_run.json").read_text())
    assert (tmp_path / "device_run.log").exists()
    for key in ("jax", "jaxlib", "optax", "flax", "backend"):
        assert results["versions"][key], key
    steps = results["steps"]
    assert list(steps) == STEPS
    assert {k: v["status"] for k, v in steps.items()} == dict.fromkeys(STEPS, "ok")
    smoke = steps["smoke"]
    for name in ("tiger", "lion", "adafactor", "adax", "adaxw", "amos", "sgdm"):
        assert smoke[name]["status"] == "ok", (name, smoke[name])
        assert smoke[name]["compilations"] == 1
    for name in ("muon", "quantize_state(adamw)"):  # optional pieces: run, or absent
        assert smoke[name]["status"] in ("ok", "absent"), (name, smoke[name])
    for name in ("speed_float32", "speed_bfloat16"):
        (row,) = steps[name]["rows"]
        assert row["ours_ms"] > 0 and row["optax_ms"] > 0 and row["fraction_of_copy"] > 0
        assert row["compilations"] == 1
    assert steps["copy_floor"]["rows"][0]["GBps"] > 0
    curves = {r["curve"] for r in steps["cost_curves"]["rows"]}
    assert curves == {"one leaf", "GPT-2 shaped", "leaf count"}
    assert os.path.exists(steps["cost_curves"]["plot"])
    assert steps["compile_times"]["rows"][0]["ratio"] > 0


def test_budget_stops_cleanly(tmp_path):
    results = device_run.run(quick=True, budget_s=0, out=str(tmp_path))
    assert {v["status"] for v in results["steps"].values()} == {"skipped"}
    saved = json.loads((tmp_path / "device_run.json").read_text())
    assert list(saved["steps"]) == STEPS
    assert saved["versions"]["jax"]
