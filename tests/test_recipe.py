"""run_training in-process, as a debugger or a notebook calls it: a short run, then a resume."""

from __future__ import annotations

import json

from so8t.exit_codes import ExitCode
from so8t.recipe import run_training
from so8t.run.metrics import read_metrics
from tests.conftest import typed_config as compose

FAST = ["debug=fast", "hardware.num_threads=1", "output.progress_bars=false", "checkpoint=step",
        "checkpoint.every_steps=2"]


def test_run_training_runs_resumes_and_continues_in_process(tmp_path):
    run_dir = tmp_path / "run"
    assert run_training(compose(FAST), run_dir) == ExitCode.OK
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (run_dir / "final" / "policy.json").is_file()
    # The same run with a larger max_steps continues from its step-3 checkpoint.
    assert run_training(compose([*FAST, "max_steps=5"]), run_dir) == ExitCode.OK
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    session = json.loads((run_dir / "session.json").read_text())
    assert session["status"] == "completed" and session["global_step"] == 5
    assert [a["resumed_from_step"] for a in session["attempts"]] == [None, 3]
    assert json.loads((run_dir / "final" / "policy.json").read_text())["step"] == 5


def test_run_training_refuses_checkpoints_of_another_config(tmp_path):
    run_dir = tmp_path / "run"
    assert run_training(compose(FAST), run_dir) == ExitCode.OK
    assert run_training(compose([*FAST, "max_steps=5", "adapter.layers=[0]"]), run_dir) == ExitCode.REFUSED
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
