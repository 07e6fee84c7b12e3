"""Checkpoints end to end through the real CLI: ``python -m so8t.train`` in subprocesses.

The unit tests (test_checkpoint_*.py) cover each case of the service in-process; these prove
the wiring: the recipe saves at the cadence the config asks for, a ``kill -9`` costs nothing but
the steps since the last checkpoint, a damaged checkpoint is skipped with a reason in train.log,
and the compatibility rules reach the user as exit codes and messages.

Each process pays ~4 s of start-up, so finished runs that several tests start from are built
once per module and copied.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from so8t.checkpoint.store import LATEST_FILE, MANIFEST_FILE, TENSORS_FILE, parse_step
from so8t.run.metrics import read_metrics
from tests.conftest import cli_argv, cli_env

pytestmark = pytest.mark.slow

N = 60  # the tiny default run's length: ~5 s of PPO updates
EXIT_REFUSED = 2
FINAL_FILES = ("adapter.safetensors", "value_head.safetensors")
TIMEOUT = 180  # per process; generous for a loaded 2-core machine


# ---------------------------------------------------------------------- helpers


def train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the CLI to its end; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cli_argv(*overrides), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(cli_argv(*overrides), cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-4000:]}"
    return result


def run_dir(cwd: Path, name: str) -> Path:
    return cwd / "outputs" / "default" / "runs" / name


def committed_steps(run: Path) -> list[int]:
    """Steps of the committed checkpoint folders (a manifest is written last, before the rename)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        step = parse_step(p.name)
        if step is not None and (p / MANIFEST_FILE).is_file():
            steps.append(step)
    return sorted(steps)


def latest(run: Path) -> str | None:
    try:
        return (run / "checkpoints" / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in FINAL_FILES:
        for key, value in load_file(run / "final" / name).items():
            tensors[f"{name}:{key}"] = value
    assert tensors, f"{run / 'final'} holds no tensors"
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def metric_rows(run: Path) -> dict[int, dict]:
    """Rows by step without the ``time/*`` durations (measured, so they differ between runs)."""
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith("time/")}
            for row in read_metrics(run / "metrics.jsonl")}


def log_text(run: Path) -> str:
    return (run / "train.log").read_text()


def resumed_step(run: Path) -> int:
    """The step of the last 'resumed from step K' line in train.log."""
    lines = [line for line in log_text(run).splitlines() if "resumed from step" in line]
    assert lines, f"train.log of {run.name} never says 'resumed from step'"
    return int(lines[-1].split("resumed from step", 1)[1].split()[0])


def kill_when(proc: subprocess.Popen, condition, what: str, poll: float = 0.02) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it ended first."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: nothing was killed")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(poll)
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) right after {what}: nothing was killed")
        proc.kill()  # SIGKILL: no handler, no end save
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def copy_run(src: Path, cwd: Path) -> Path:
    dst = run_dir(cwd, src.name)
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """``max_steps=N`` straight through, with the default cadence."""
    cwd = tmp_path_factory.mktemp("straight")
    ok(train(cwd, "run_name=straight", f"max_steps={N}"))
    return run_dir(cwd, "straight")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A completed 10-step run with checkpoints at 3, 6, 9 and 10 (end); tests copy it."""
    cwd = tmp_path_factory.mktemp("base")
    ok(train(cwd, "run_name=base", "max_steps=10", "checkpoint.every_steps=3"))
    run = run_dir(cwd, "base")
    assert committed_steps(run) == [3, 6, 9, 10]
    assert latest(run) == "step_00000010"
    return run


BASE_ARGS = ("run_name=base", "checkpoint.every_steps=3")


# ---------------------------------------------------------------------- bit-exact resume


def test_sigkill_after_half_then_rerun_is_bit_exact(tmp_path, straight):
    args = ("run_name=killed", f"max_steps={N}", "checkpoint.every_steps=5")
    run = run_dir(tmp_path, "killed")
    proc = start(tmp_path, *args)

    def latest_step() -> int:
        name = latest(run)
        return (parse_step(name) or 0) if name else 0

    # LATEST, not the folders: it moves after the commit, and resume trusts it first, so a
    # kill between the two would resume from the checkpoint before (correct, but not past N/2).
    kill_when(proc, lambda: latest_step() > N // 2, f"LATEST naming a checkpoint past step {N // 2}")
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    killed_at = latest_step()
    assert N // 2 < killed_at < N

    ok(train(tmp_path, *args))
    k = resumed_step(run)
    assert k == killed_at, f"resumed from step {k}, LATEST named step {killed_at}"
    assert_same_tensors(final_tensors(run), final_tensors(straight))

    rows, expected = metric_rows(run), metric_rows(straight)
    assert sorted(rows) == list(range(1, N + 1))
    after = [s for s in rows if s > k]
    assert after and all(rows[s] == expected[s] for s in after), "rows after the resume point differ"
    assert all(rows[s] == expected[s] for s in rows if s <= k), "rows before the resume point differ"


def test_time_cadence_kill_at_a_random_moment_then_rerun(tmp_path, straight):
    """The issue's "Done when", scaled down: time checkpoints, kill -9 anywhere, same weights."""
    args = ("run_name=timed", f"max_steps={N}", "checkpoint=time", "checkpoint.every_seconds=0.3",
            "checkpoint.keep_last=3")
    run = run_dir(tmp_path, "timed")
    proc = start(tmp_path, *args)
    # Kill within ~1.5 s of training (3 saves + the delay): the run takes ~5 s of it here, so
    # even a machine three times faster is still running.
    delay = random.uniform(0.0, 0.6)
    when: list[float] = []

    def three_saved_then_delay() -> bool:
        if not when:
            if len(committed_steps(run)) >= 3:
                when.append(time.monotonic() + delay)
            return False
        return time.monotonic() >= when[0]

    kill_when(proc, three_saved_then_delay, f"3 time checkpoints + {delay:.2f} s")
    assert proc.returncode == -signal.SIGKILL

    ok(train(tmp_path, *args))
    assert 0 < resumed_step(run) < N
    assert_same_tensors(final_tensors(run), final_tensors(straight))
    assert metric_rows(run) == metric_rows(straight)

    steps = committed_steps(run)
    assert len(steps) == 3 and steps[-1] == N, steps  # keep_last, the newest being the end save
    assert latest(run) == f"step_{N:08d}"
    reasons = [json.loads((run / "checkpoints" / f"step_{s:08d}" / MANIFEST_FILE).read_text())["reason"]
               for s in steps]
    # The end save is skipped when a time save already committed the last step.
    assert reasons[-1] in ("end", "time") and set(reasons[:-1]) <= {"time"}, reasons


# ---------------------------------------------------------------------- corruption


def _no_latest_and_a_leftover_temporary(checkpoints: Path) -> None:
    (checkpoints / LATEST_FILE).unlink()
    tmp = checkpoints / ".tmp-step_00000011-0badf00d"
    tmp.mkdir()
    (tmp / TENSORS_FILE).write_bytes(b"half a checkpoint")


@pytest.mark.parametrize(
    "damage, resumed_from, expected_log",
    [
        (lambda c: flip_byte(c / "step_00000010" / TENSORS_FILE), 9,
         ["Rejected checkpoint", "step_00000010", "sha256 mismatch for state.safetensors"]),
        (_no_latest_and_a_leftover_temporary, 10,
         ["LATEST is missing", "Removing incomplete checkpoint", ".tmp-step_00000011-0badf00d"]),
    ],
    ids=["flipped-byte", "no-latest+leftover-temp"],
)
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, base, damage, resumed_from, expected_log):
    # Each kind of damage is covered in-process by test_checkpoint_service.py; two of them
    # here prove that the CLI logs the reason to train.log and carries on.
    run = copy_run(base, tmp_path)
    damage(run / "checkpoints")
    ok(train(tmp_path, *BASE_ARGS, "max_steps=12"))
    log = log_text(run)
    for text in expected_log:
        assert text in log
    assert resumed_step(run) == resumed_from
    rows = metric_rows(run)
    assert sorted(rows) == list(range(1, 13))
    # The redone steps match what the first attempt logged for them.
    before = metric_rows(base)
    assert all(rows[s] == before[s] for s in range(1, 11))
    assert latest(run) == "step_00000012"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_every_checkpoint_corrupt_refuses_to_start(tmp_path, base):
    run = copy_run(base, tmp_path)
    for step in committed_steps(run):
        flip_byte(run / "checkpoints" / f"step_{step:08d}" / TENSORS_FILE)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    log_before = len(log_text(run))
    result = train(tmp_path, *BASE_ARGS, "max_steps=12")
    assert result.returncode == EXIT_REFUSED, result.stdout[-4000:]
    assert "none is usable" in result.stdout
    for step in (3, 6, 9, 10):
        assert f"step_{step:08d}: sha256 mismatch" in result.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert committed_steps(run) == [3, 6, 9, 10]  # nothing deleted
    new_log = log_text(run)[log_before:]
    assert "none is usable" in new_log and "starting fresh" not in new_log and "step 1:" not in new_log


# ---------------------------------------------------------------------- retention


def test_retention_keeps_last_n_plus_milestones(tmp_path):
    ok(train(tmp_path, "run_name=kept", "max_steps=30", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
             "checkpoint.keep_every_steps=10"))
    run = run_dir(tmp_path, "kept")
    assert committed_steps(run) == [10, 20, 26, 28, 30]
    assert latest(run) == "step_00000030"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "LATEST", "step_00000010", "step_00000020", "step_00000026", "step_00000028", "step_00000030"]


# ---------------------------------------------------------------------- compatibility


def test_changing_the_adapter_shape_is_refused(tmp_path, base):
    run = copy_run(base, tmp_path)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    result = train(tmp_path, *BASE_ARGS, "max_steps=12", "adapter.layers=[-1]")
    assert result.returncode == EXIT_REFUSED, result.stdout[-4000:]
    assert "adapter.layers" in result.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert committed_steps(run) == [3, 6, 9, 10]


def test_raising_max_steps_continues_the_run(tmp_path, base):
    run = copy_run(base, tmp_path)
    ok(train(tmp_path, *BASE_ARGS, "max_steps=13"))
    assert resumed_step(run) == 10
    rows = metric_rows(run)
    assert sorted(rows) == list(range(1, 14))
    assert latest(run) == "step_00000013"
    assert json.loads((run / "session.json").read_text())  # still readable after two attempts


def test_a_completed_run_exits_at_once(tmp_path, base):
    run = copy_run(base, tmp_path)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    result = ok(train(tmp_path, *BASE_ARGS, "max_steps=10"))
    assert "already completed" in result.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert committed_steps(run) == [3, 6, 9, 10]


def test_resume_never_refuses_a_folder_with_checkpoints(tmp_path, base):
    run = copy_run(base, tmp_path)
    result = train(tmp_path, *BASE_ARGS, "max_steps=12", "resume=never")
    assert result.returncode == EXIT_REFUSED, result.stdout[-4000:]
    assert "run_name" in result.stdout
    assert committed_steps(run) == [3, 6, 9, 10]


def test_resume_from_a_path_forks_into_a_new_run(tmp_path, base):
    source = base / "checkpoints" / "step_00000006"
    ok(train(tmp_path, "run_name=forked", "max_steps=10", f"resume={source}"))
    run = run_dir(tmp_path, "forked")
    assert resumed_step(run) == 6
    rows = metric_rows(run)
    assert sorted(rows) == [7, 8, 9, 10]
    # Same config, same state at step 6: the fork redoes steps 7..10 exactly.
    original = metric_rows(base)
    assert all(rows[s] == original[s] for s in rows)
    assert_same_tensors(final_tensors(run), final_tensors(base))
    assert committed_steps(base) == [3, 6, 9, 10]  # the source run is untouched


# ---------------------------------------------------------------------- the files themselves


def test_checkpoint_files_are_plain_safetensors(base, tmp_path):
    """state.safetensors is streamed by so8t's own writer: any safetensors reader must take it,
    for every dtype a state can hold (the CLI run itself holds float32, 0-d and uint8 tensors)."""
    from safetensors import safe_open

    from so8t.checkpoint import CheckpointStore

    with safe_open(str(base / "checkpoints" / "step_00000010" / TENSORS_FILE), "pt") as f:
        keys = list(f.keys())
        assert any(k.startswith("parts.weights.") for k in keys)
        assert any(k.startswith("parts.optimizer.") for k in keys)
        assert f.get_tensor("rng.torch_cpu").dtype == torch.uint8

    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(3, dtype=torch.float64), "i64": torch.arange(5),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6).t(),
    }
    store = CheckpointStore(tmp_path / "checkpoints")
    path = store.save(1, tensors, {"x": 1})
    assert store.verify(path) == []
    loaded, state, _ = store.load(path)
    assert state == {"x": 1} and sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
