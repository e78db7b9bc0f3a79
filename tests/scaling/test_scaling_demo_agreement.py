"""One noise-scale answer: the demo's printout, ``python -m scaling noise`` on the demo's
log and ``ox.current_noise_scale`` on the demo's final state agree to the printed digit."""

import argparse
import json

import optax_ext as ox
from optax_ext import demo
from optax_ext.demo import recipes, report
from scaling import default_window
from scaling.__main__ import main


def test_demo_cli_and_api_print_the_same_current_value(tmp_path, capsys):
    log = tmp_path / "noise.jsonl"
    steps = 24
    with log.open("w") as f:
        history = demo.train(
            steps=steps, batch_size=8, seq_len=16, width=32, layers=1, optimizer="adamw",
            progress=False, on_step=lambda record: f.write(json.dumps(record) + "\n"),
        )  # fmt: skip
    args = argparse.Namespace(optimizer="adamw", lr=None, batch_size=8, accumulation_steps=1)
    args.steps = steps
    report.print_recommendations(report.recommendations(history, args), history, args)
    demo_out = capsys.readouterr().out
    assert main(["noise", str(log)]) == 0
    cli_out = capsys.readouterr().out
    assert main(["noise", str(log), "--json"]) == 0
    cli_json = json.loads(capsys.readouterr().out)
    api = ox.current_noise_scale(history.state.opt_state)

    # the same window everywhere: the transform's, the demo's readout's and the CLI default
    assert recipes.noise_window(steps) == default_window(steps) == api.window == 10
    assert api == history.current
    line = history.current.summary()  # "current B_simple = 12 ± 3.4 (last 10 updates): ..."
    assert line in cli_out.splitlines()
    assert history.current.summary(unit="windows") in demo_out
    assert api.summary() == line
    assert cli_json["b_simple"] == api.b_simple and cli_json["text"] == api.text()
    # the recommendations carry the lr range and say they are the centre of a sweep
    assert "lr range (±1 s.e.)" in demo_out and "centre of a small sweep" in demo_out
