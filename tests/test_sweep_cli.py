"""Sweeps that resume: the real CLI in subprocesses on the tiny default.

A 2x2 sweep lands in four folders named from each job's overrides; killed mid-way (SIGKILL to
its process group) and re-run with the same command, it completes every job, skipping the
completed ones and resuming the interrupted ones from their checkpoints. A joblib sweep runs two
jobs side by side. A failed job does not stop the others. ``so8t-compare`` reads the sweep.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from so8t.config import CONF_DIR, register, sweep_name_of
from so8t.run.metrics import read_metrics

pytestmark = pytest.mark.slow  # real processes

register()

MAX_STEPS = 16
SWEEP = ("seed=1,2", "ppo.clip_range=0.1,0.2")
COMMON = ("output.progress_bars=false", f"max_steps={MAX_STEPS}", "checkpoint.every_steps=2",
          "hardware.num_threads=1")
SWEEP_DIR = Path("outputs/default/sweeps/ppo.clip_range=0.1,0.2,seed=1,2")
JOBS = sorted(f"ppo.clip_range={c},seed={s}" for c in ("0.1", "0.2") for s in (1, 2))


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}


def _sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "so8t.train", "-m", *args]


def _session(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / "session.json").read_text())
    except (OSError, ValueError):
        return None


def _latest_step(job_dir: Path) -> int | None:
    try:
        return int((job_dir / "checkpoints" / "LATEST").read_text().strip().rsplit("_", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def _state(job_dir: Path) -> str | None:
    session = _session(job_dir)
    if session and session.get("status") == "completed":
        return "completed"
    if _latest_step(job_dir):
        return "checkpointed"
    return None


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """Run the 2x2 sweep, SIGKILL it once a job completed and another has a checkpoint, then
    re-run the same command. Returns what was on disk in between and the re-run's result."""
    cwd = tmp_path_factory.mktemp("sweep")
    cmd = _sweep_cmd(*COMMON, *SWEEP)
    sweep = cwd / SWEEP_DIR
    with open(cwd / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                states = {job: _state(sweep / job) for job in JOBS}
                if "completed" in states.values() and "checkpointed" in states.values():
                    break
                assert proc.poll() is None, "the sweep ended before it could be killed:\n" + \
                    (cwd / "first.log").read_text()[-3000:]
                time.sleep(0.02)
            else:
                pytest.fail("no job completed / checkpointed in time")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = {}
    for job in JOBS:
        job_dir = sweep / job
        log_file = job_dir / "train.log"
        before[job] = {
            "state": _state(job_dir),
            "session": _session(job_dir),
            "checkpoint": _latest_step(job_dir),
            "metrics": (job_dir / "metrics.jsonl").read_bytes() if (job_dir / "metrics.jsonl").exists() else None,
            "log_lines": len(log_file.read_text().splitlines()) if log_file.exists() else 0,
        }
    started = time.monotonic()
    rerun = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return cwd, before, rerun, time.monotonic() - started


def test_jobs_land_in_four_folders_named_from_their_overrides(killed_then_rerun):
    cwd, _, rerun, _ = killed_then_rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    sweep = cwd / SWEEP_DIR
    # The same command found the same sweep folder; no folder is named by a job number.
    assert sorted(p.name for p in (cwd / "outputs" / "default" / "sweeps").iterdir()) == [SWEEP_DIR.name]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == JOBS
    assert (sweep / "multirun.yaml").exists()
    for job in JOBS:
        overrides = OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        clip, seed = job.split(",")
        assert clip in overrides and seed in overrides


def test_rerun_skips_completed_jobs_and_resumes_interrupted_ones(killed_then_rerun):
    cwd, before, rerun, seconds = killed_then_rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    sweep = cwd / SWEEP_DIR
    states = [b["state"] for b in before.values()]
    assert "completed" in states and "checkpointed" in states
    for job, old in before.items():
        job_dir = sweep / job
        session = _session(job_dir)
        assert session["status"] == "completed" and session["global_step"] == MAX_STEPS, job
        assert [r["step"] for r in read_metrics(job_dir / "metrics.jsonl")] == list(range(1, MAX_STEPS + 1))
        new_log = (job_dir / "train.log").read_text().splitlines()[old["log_lines"]:]
        if old["state"] == "completed":
            # Skipped: nothing built, trained or recorded; session.json and metrics untouched.
            assert any("(session.json); skipped" in line for line in new_log), job
            assert not any("run dir:" in line or "step 1:" in line for line in new_log), job
            assert session == old["session"], job
            assert (job_dir / "metrics.jsonl").read_bytes() == old["metrics"], job
        elif old["state"] == "checkpointed":
            # Resumed from its checkpoint, not restarted: the killed attempt is on record.
            attempts = session["attempts"]
            assert attempts[-2]["end_reason"] == "killed", attempts
            resumed = attempts[-1]["resumed_from_step"]
            assert resumed is not None and resumed >= old["checkpoint"] >= 2, (job, attempts)
            assert any(f"resumed from step {resumed} " in line for line in new_log), job
            assert not any("starting fresh" in line for line in new_log), job
            assert old["metrics"].count(b"\n") >= resumed
        else:
            # Not started (or killed before its first checkpoint): runs from the start.
            assert session["attempts"][-1]["resumed_from_step"] is None, job


def test_compare_reports_the_four_jobs_and_what_differs(killed_then_rerun, tmp_path):
    cwd, before, _, _ = killed_then_rerun
    proc = subprocess.run([sys.executable, "-m", "so8t.compare", "outputs", "--format", "json"],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["version"] == 1 and report["skipped"] == []
    assert report["differing_keys"] == ["ppo.clip_range", "seed"]
    rows = {Path(r["path"]).name: r for r in report["runs"]}
    assert sorted(rows) == JOBS
    for job, row in rows.items():
        clip, seed = (part.split("=")[1] for part in job.split(","))
        assert row["config"] == {"ppo.clip_range": float(clip), "seed": int(seed)}
        assert row["experiment"] == "default" and row["run"] == f"sweeps/{SWEEP_DIR.name}/{job}"
        assert row["status"] == "completed" and row["step"] == row["max_steps"] == MAX_STEPS
        assert row["last_checkpoint_step"] == MAX_STEPS
        assert row["resumes"] == (1 if before[job]["state"] == "checkpointed" else 0)
        summary = row["metrics"]["reward/mean"]
        rewards = [r["reward/mean"] for r in read_metrics(cwd / SWEEP_DIR / job / "metrics.jsonl")]
        assert summary["last"] == rewards[-1] and summary["last_step"] == MAX_STEPS
        assert summary["best"] == max(rewards) and rewards[summary["best_step"] - 1] == max(rewards)

    plot = tmp_path / "rewards.png"
    proc = subprocess.run([sys.executable, "-m", "so8t.compare", str(cwd / "outputs"), "--plot", str(plot)],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), proc.stdout
    assert len([line for line in lines if "completed" in line]) == 4
    assert "clip_range" in proc.stdout and "seed" in proc.stdout


def test_joblib_launcher_runs_two_jobs_side_by_side_and_a_failed_job_spares_the_others(tmp_path):
    # Four jobs, two at a time: the two with ppo.clip_range=-1 fail validation.
    proc = subprocess.run(
        _sweep_cmd("hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "sweep_name=par/allel",
                   "output.progress_bars=false", "max_steps=8", "hardware.num_threads=1",
                   "ppo.clip_range=0.2,-1", "seed=3,4"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # the failed jobs are reported at the end
    assert "JobFailed" in output or "refused" in output
    sweep = tmp_path / "outputs" / "default" / "sweeps" / "par_allel"  # a '/' never nests folders
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "ppo.clip_range=-1,seed=3", "ppo.clip_range=-1,seed=4",
        "ppo.clip_range=0.2,seed=3", "ppo.clip_range=0.2,seed=4"]
    attempts = []
    for seed in (3, 4):
        session = _session(sweep / f"ppo.clip_range=0.2,seed={seed}")
        assert session["status"] == "completed" and session["global_step"] == 8
        attempts.append(session["attempts"][-1])
        failed_log = (sweep / f"ppo.clip_range=-1,seed={seed}" / "train.log").read_text()
        assert "ppo.clip_range=-1" in failed_log and "must be > 0" in failed_log
        assert not (sweep / f"ppo.clip_range=-1,seed={seed}" / "session.json").exists()
    first, second = attempts
    assert first["pid"] != second["pid"]  # two worker processes ...
    spans = [(datetime.fromisoformat(a["started"]), datetime.fromisoformat(a["ended"])) for a in attempts]
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1], spans  # ... at the same time


def test_basic_launcher_runs_every_job_when_one_fails(tmp_path):
    # Both jobs fail validation (no model is built: seconds); the second still runs.
    proc = subprocess.run(_sweep_cmd("sweep_name=bad", "ppo.clip_range=-1,-2"), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    sweep = tmp_path / "outputs" / "default" / "sweeps" / "bad"
    for value in ("-1", "-2"):
        log = (sweep / f"ppo.clip_range={value}" / "train.log").read_text()
        assert f"ppo.clip_range={value}" in log


# ------------------------------------------------------------------------------------------
# in-process: names, launcher configs, objective


def test_sweep_name_rule():
    def name(task, sweep_name=None, params=None):
        hydra = {"overrides": {"task": task}, "sweeper": {"params": params}}
        return sweep_name_of(OmegaConf.create({"sweep_name": sweep_name, "hydra": hydra}))

    assert name(["seed=1,2", "ppo.clip_range=0.1,0.2"]) == "ppo.clip_range=0.1,0.2,seed=1,2"
    assert name(["ppo.clip_range=0.1,0.2", "seed=1,2", "hardware=rtx3060", "max_steps=5"]) == \
        "ppo.clip_range=0.1,0.2,seed=1,2"
    assert name(["seed=1,2"], sweep_name="a/b") == "a_b"
    assert name(["hardware=cpu"]) == "default"
    assert name(["seed=1,2"], params={"ppo.clip_range": "0.1,0.2"}) == "ppo.clip_range=0.1,0.2,seed=1,2"
    long = name([f"data.path=/very/long/path/{'x' * 100}.jsonl,/other.jsonl"])
    assert "/" not in long and len(long) <= 80


def _compose_hydra(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_parallel_launcher_config_selects_joblib():
    cfg = _compose_hydra(["hydra/launcher=parallel"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_slurm_launcher_config_sends_the_signal_so8t_stops_on(tmp_path):
    from hydra.utils import instantiate
    from submitit.slurm.slurm import _make_sbatch_string

    from so8t.run.signals import default_stop_signals

    cfg = _compose_hydra(["hydra/launcher=slurm"])
    launcher = instantiate(cfg.hydra.launcher)
    params = launcher.params
    assert params["additional_parameters"] == {"signal": f"USR1@{params['signal_delay_s']}", "requeue": True}
    script = _make_sbatch_string(command="python -m x", folder=tmp_path, signal_delay_s=params["signal_delay_s"],
                                 additional_parameters=params["additional_parameters"])
    assert f"#SBATCH --signal=USR1@{params['signal_delay_s']}" in script
    assert "#SBATCH --requeue" in script and "USR2" not in script
    assert int(signal.SIGUSR1) in default_stop_signals() and int(signal.SIGTERM) in default_stop_signals()


def test_objective_is_the_mean_reward_of_the_last_tenth(tmp_path, monkeypatch):
    import math

    from so8t import sweep
    from so8t.run.metrics import MetricsWriter

    with MetricsWriter(tmp_path / "metrics.jsonl") as writer:
        for step in range(1, 21):
            writer.write({"step": step, "reward/mean": float(step)})
        writer.write({"step": 20, "reward/mean": 40.0})  # redone after a resume: the last row wins
    assert sweep.final_reward(tmp_path) == (19.0 + 40.0) / 2
    assert math.isnan(sweep.final_reward(tmp_path / "nowhere"))
    assert sweep.job_result(0, tmp_path) == (19.0 + 40.0) / 2
    # optimized_metric picks another metric for the sweeper; one the run never logged gives NaN.
    with MetricsWriter(tmp_path / "other.jsonl") as writer:
        for step in range(1, 11):
            writer.write({"step": step, "reward/mean": 0.0, "kl/mean": step / 10})
    assert sweep.job_result(0, tmp_path, "other.jsonl", "kl/mean") == 1.0
    assert math.isnan(sweep.job_result(0, tmp_path, "other.jsonl", "no/such_metric"))
    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    for code in (1, 2, 3):
        with pytest.raises(sweep.JobFailed) as failed:  # an Exception: the launcher goes on
            sweep.job_result(code, tmp_path)
        # joblib and submitit send it back from the worker pickled.
        copy = pickle.loads(pickle.dumps(failed.value))
        assert (copy.code, copy.run_dir, str(copy)) == (code, tmp_path, str(failed.value))
    for code in (75, 130, 143):
        with pytest.raises(SystemExit) as info:  # a stop ends the sweep
            sweep.job_result(code, tmp_path)
        assert info.value.code == code
    monkeypatch.setattr(sweep, "in_multirun", lambda: False)
    with pytest.raises(SystemExit) as info:
        sweep.job_result(2, tmp_path)
    assert info.value.code == 2


def test_a_launcher_without_its_plugin_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    from so8t import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    assert train._missing_launcher(["-m", "hydra/launcher=parallel", "seed=1,2"]) == (
        'hydra/launcher=parallel needs the sweep extra: pip install "so8t[sweep]"')
    assert train._missing_launcher(["hydra/launcher=basic", "seed=1"]) is None
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert train._missing_launcher(["-m", "hydra/launcher=slurm"]) is None  # installed here
