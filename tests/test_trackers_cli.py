"""Experiment trackers through the real CLI, read back with each tracker's own reader:
TensorBoard's EventAccumulator, W&B's offline run files, MLflow's store through MlflowClient.

The run is killed with SIGKILL after its first checkpoint and re-run with the same command: each
tracker must then hold every step exactly once, in order, with the values of metrics.jsonl, in the
same tracker run it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from so8t.config.validate import ConfigValidationError, validate
from so8t.run.metrics import read_metrics
from so8t.run.wandb_log import history, run_files
from tests.conftest import cli_argv, cli_env, compose

pytestmark = pytest.mark.slow

MAX_STEPS = 12
TIMEOUT = 240


def _env(tmp_path: Path) -> dict:
    return cli_env(WANDB_MODE="offline", WANDB_SILENT="true",
                   # MLflow 3 keeps its file store working only on request; it is the store read here.
                   MLFLOW_ALLOW_FILE_STORE="true", WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                   WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))


def _argv(mlruns: Path) -> list[str]:
    return cli_argv("logger=all", f"logger.mlflow.tracking_uri={mlruns.as_uri()}", f"max_steps={MAX_STEPS}",
                    "run_name=tracked", "checkpoint=step", "checkpoint.every_steps=4",
                    "checkpoint.async_write=false",
                    # Slower updates (~0.15 s), so the kill surely lands between two checkpoints.
                    "ppo.rollout_batch_size=64", "hardware.num_threads=1")


def _raw_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trackers")
    cwd = tmp_path / "work"
    cwd.mkdir()
    mlruns = tmp_path / "mlruns"
    run_dir = cwd / "outputs" / "default" / "runs" / "tracked"
    metrics = run_dir / "metrics.jsonl"
    out = open(tmp_path / "first.out", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(_argv(mlruns), cwd=cwd, env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    try:
        # Past the checkpoint of step 4 and at least one step beyond it, well before the end.
        while not (metrics.exists() and 6 <= len(read_metrics(metrics))):
            assert first.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first attempt made no progress"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        out.close()
    steps_before_kill = len(read_metrics(metrics))
    assert steps_before_kill < MAX_STEPS, "the kill came too late to test a resume"
    second = subprocess.run(_argv(mlruns), cwd=cwd, env=_env(tmp_path), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step" in second.stdout + second.stderr
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    # Steps after the last checkpoint were logged by the killed attempt and again after the resume.
    assert _raw_rows(metrics) > MAX_STEPS
    session = json.loads((run_dir / "session.json").read_text())
    return run_dir, mlruns, rows, session


def test_tensorboard_holds_each_step_once_after_a_kill_and_resume(killed_and_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, rows, _ = killed_and_resumed
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [s.step for s in scalars] == list(range(1, MAX_STEPS + 1))
    assert [s.value for s in scalars] == pytest.approx([r["reward/mean"] for r in rows], abs=1e-6)
    assert "loss/total" in events.Tags()["scalars"] and "kl/mean" in events.Tags()["scalars"]


def test_wandb_continues_the_same_offline_run_without_a_step_twice(killed_and_resumed):
    run_dir, _, rows, session = killed_and_resumed
    run_id = session["trackers"]["wandb"]["id"]
    files = run_files(run_dir / "wandb", run_id)
    assert len(files) == 2, files  # one offline file per attempt, both of the same W&B run id
    logged = [row for file in files for row in history(file)]
    assert [row["_step"] for row in logged] == list(range(1, MAX_STEPS + 1))
    assert [row["reward/mean"] for row in logged] == pytest.approx([r["reward/mean"] for r in rows], abs=1e-9)
    assert all(p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*"))


def test_mlflow_continues_the_same_run_without_a_step_twice(killed_and_resumed):
    from mlflow.tracking import MlflowClient

    _, mlruns, rows, session = killed_and_resumed
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    experiment = client.get_experiment_by_name("default")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [session["trackers"]["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["ppo.rollout_batch_size"] == "64"
    history_ = sorted(client.get_metric_history(run.info.run_id, "reward/mean"), key=lambda m: m.timestamp)
    assert [m.step for m in history_] == list(range(1, MAX_STEPS + 1))
    assert [m.value for m in history_] == pytest.approx([r["reward/mean"] for r in rows], abs=1e-9)


# ---------------------------------------------------------------------- refusals, in seconds


def test_an_unknown_backend_is_refused_naming_the_choices():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose(["logger.backends=[jsonl,neptune]"])
    text = str(info.value) + str(info.value.__cause__)
    assert "logger.backends" in text and "'neptune', expected one of [jsonl, tensorboard, wandb, mlflow]" in text


def test_a_backend_whose_package_is_missing_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigValidationError, match=r'the wandb package is not installed: pip install "so8t\[wandb\]"'):
        validate(compose(["logger=wandb"]))

