"""Data parallel across two JAX processes equals one process on the same global batch.

Two worker processes (``multiprocess_worker.py``) join a ``jax.distributed`` job on
localhost, one CPU device each, with gloo collectives, and train a small Flax MLP with
``jax.pmap`` over both processes' devices: ``measure_noise_scale(axis_name=...)`` first in
the chain (it reads the per-device gradient, then averages it across the processes),
then Tiger accumulating 2 micro-batches inside its momentum. This process runs the same
model, data and step on 2 of its 8 fake devices; parameters, losses and the noise-scale
estimates must agree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multiprocess_worker as worker
import numpy as np
import pytest
from helpers import one_device_env

WORKER = Path(__file__).with_name("multiprocess_worker.py")
REPO = WORKER.parent.parent
TIMEOUT_S = 120.0


def _gloo_available() -> bool:
    try:
        from jaxlib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(
    not _gloo_available(),
    reason="this jaxlib build has no gloo CPU collectives (jaxlib._jax.make_gloo_tcp_collectives)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    """This environment with CPU only, one device per process (the test process has 8) and
    this checkout importable."""
    env = one_device_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class WorkersFailed(AssertionError):
    """A worker exited with an error, or the job ran past its time limit."""


def _report(ids, procs, logs, why: str) -> str:
    parts = [why]
    for i, p, log in zip(ids, procs, logs, strict=True):
        log.seek(0)
        err = log.read().decode(errors="replace")[-4000:]
        status = "still running" if p.returncode is None else f"exit status {p.returncode}"
        parts.append(f"--- process {i} ({status}), stdout and stderr:\n{err}")
    return "\n".join(parts)


def run_workers(
    tmp_path,
    *,
    process_ids=(0, 1),
    num_processes=2,
    timeout=TIMEOUT_S,
    meanwhile=None,
    started=None,
):
    """Runs the workers of one job; returns their saved results, in ``process_ids`` order,
    and what ``meanwhile()`` (called here while they run) returned.

    Fails fast when any worker exits with an error, and after ``timeout`` seconds.
    Whatever happens, every worker still running is killed and waited for (no zombies);
    the ``Popen`` objects are appended to ``started`` for inspection.
    """
    port = _free_port()
    procs, logs = [] if started is None else started, []
    outs = [tmp_path / f"worker{i}.npz" for i in process_ids]
    try:
        for i, out in zip(process_ids, outs, strict=True):
            log = open(tmp_path / f"worker{i}.log", "w+b")  # noqa: SIM115 (closed below)
            logs.append(log)
            cmd = [
                sys.executable,
                str(WORKER),
                "--process-id",
                str(i),
                "--num-processes",
                str(num_processes),
                "--port",
                str(port),
                "--out",
                str(out),
            ]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT
                )
            )
        deadline = time.monotonic() + timeout
        extra = meanwhile() if meanwhile is not None else None
        # Poll every worker each time (``any`` over ``poll()`` would stop at the first).
        while None in (codes := [p.poll() for p in procs]):
            if any(code not in (None, 0) for code in codes):
                raise WorkersFailed(_report(process_ids, procs, logs, "a worker failed"))
            if time.monotonic() > deadline:
                why = f"workers still running after {timeout} s"
                raise WorkersFailed(_report(process_ids, procs, logs, why))
            time.sleep(0.05)
        if any(p.returncode for p in procs):
            raise WorkersFailed(_report(process_ids, procs, logs, "a worker failed"))
        return [dict(np.load(out)) for out in outs], extra
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for log in logs:
            log.close()


def _params(result):
    return {k: v for k, v in result.items() if k.startswith("param:")}


def test_two_processes_match_one_process(tmp_path):
    def reference():
        # The same model, data and step in this one process, on 2 of its devices.
        assert jax.local_device_count() >= 2
        return worker.results(*worker.train([0, 1], 2))

    started = []
    results, ref = run_workers(tmp_path, meanwhile=reference, started=started)
    assert [p.returncode for p in started] == [0, 0]
    init = worker.flat_params(worker.create_state(2).params)

    assert [int(r["process_index"]) for r in results] == [0, 1]
    assert all(int(r["device_count"]) == 2 for r in results)
    # Replicas of one computation on the same averaged values: identical bits.
    for name in _params(ref):
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)
    for r in results:
        assert set(_params(r)) == set(_params(ref))
        for name, want in _params(ref).items():
            np.testing.assert_allclose(r[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
        for key in ("b_simple", "g2", "trace_sigma", "last_g2", "last_trace_sigma"):
            np.testing.assert_allclose(r[key], ref[key], rtol=1e-4, err_msg=key)
        assert int(r["noise_count"]) == worker.MICRO_STEPS

    # The run is not vacuous: every leaf moved, and every step was measured (an axis that
    # did not span the processes would leave the estimates at their initial NaN).
    for name, want in _params(ref).items():
        assert not np.allclose(want, init[name]), name
    assert all(np.isfinite(ref[k]) for k in ("b_simple", "g2", "trace_sigma"))
    assert ref["b_simple"] > 0


def test_workers_are_killed_and_reaped_on_timeout(tmp_path):
    # Process 1 of 2 never starts, so process 0 cannot finish: the time limit must fire.
    started = []
    with pytest.raises(WorkersFailed, match="still running after"):
        run_workers(tmp_path, process_ids=(0,), timeout=3.0, started=started)
    _assert_reaped(started)


def test_a_failing_worker_stops_the_job_and_its_output_is_shown(tmp_path):
    # Process id 7 of 2 is rejected at start-up; process 0 would wait for its peer.
    started = []
    with pytest.raises(WorkersFailed, match="a worker failed") as failure:
        run_workers(tmp_path, process_ids=(0, 7), timeout=TIMEOUT_S, started=started)
    assert "process_id < num_processes" in str(failure.value)
    assert started[1].returncode == 1
    assert started[0].returncode < 0  # killed, not left waiting for the time limit
    _assert_reaped(started)


def _assert_reaped(procs):
    for p in procs:
        assert p.returncode is not None  # waited for
        assert not Path(f"/proc/{p.pid}").exists() or _state(p.pid) != "Z", p.pid


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
