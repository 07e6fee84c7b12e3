"""The run lifecycle through the real CLI: ``python -m so8t.train`` in subprocesses that get
real signals, ``kill -9``, a rival process and a deadline.

What is proved here (the building blocks have their unit tests in test_run_*.py):

* SIGINT, SIGTERM, SIGUSR1 mid-run: exit 128 + signal, a "signal" checkpoint at the last
  completed step, ``status: interrupted``; the same command finishes the run with every step
  logged exactly once (a signal stop redoes nothing).
* A double Ctrl+C kills at once and leaves a folder that resumes from a sound checkpoint.
* A second process on a live run dir is refused (exit 3) naming the holder's pid; the first
  is not disturbed.
* Three attempts (SIGTERM, kill -9, finish) are told by ``session.json`` and ``attempts/``,
  and ``total_training_time`` does not count the gaps between them.
* ``max_wall_seconds`` stops in time with a "deadline" checkpoint and exit 75.

Each process costs ~4 s of start-up, so every test starts as few as it can: SIGINT and
SIGUSR1 stop two attempts of one run, and SIGTERM is the first of the three-attempt test, all
with the same checks (``assert_signal_stop``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from so8t.checkpoint.store import LATEST_FILE, MANIFEST_FILE, CheckpointStore, checkpoint_name, parse_step
from so8t.run.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name == "nt", reason="POSIX signals")]

EXIT_LOCKED = 3
EXIT_DEADLINE = 75
TIMEOUT = 180  # per process; generous for a loaded 2-core machine
# Slower updates (~0.15 s) for the signal tests, so a signal surely lands mid-training.
SLOW = ("ppo.rollout_batch_size=64",)


# ---------------------------------------------------------------------- helpers


class Proc:
    """A CLI process whose output goes to a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, cwd: Path, overrides: tuple[str, ...], label: str):
        self.out_path = cwd.parent / f"{cwd.name}-{label}.out"
        self._out = open(self.out_path, "w")  # noqa: SIM115 - closed in wait()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "so8t.train", "output.progress_bars=false", *overrides],
            cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1"),
            stdout=self._out, stderr=subprocess.STDOUT,
        )
        self.pid = self.popen.pid
        self.ended: float | None = None

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"pid {self.pid} still running after {timeout} s:\n{self.output[-3000:]}") from None
        if self.ended is None:
            self.ended = time.monotonic()
        self._out.close()
        return rc

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def wall(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


@pytest.fixture
def cli(tmp_path):
    """``cli(*overrides, label=...)`` starts a process in ``tmp_path/work``; all are reaped."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    procs: list[Proc] = []

    def start(*overrides: str, label: str = "run") -> Proc:
        proc = Proc(cwd, overrides, f"{len(procs) + 1}-{label}")
        procs.append(proc)
        return proc

    start.cwd = cwd
    yield start
    for proc in procs:
        if proc.alive():
            proc.signal(signal.SIGCONT)
            proc.popen.kill()
            proc.popen.wait()


def run_dir_of(cwd: Path) -> Path:
    """The one run folder: overrides that do not change the result (max_steps, checkpoint.*,
    max_wall_seconds, output.*, logger.*) must not change the folder, or a re-run would not resume."""
    dirs = sorted(cwd.glob("outputs/*/runs/*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def wait_until(predicate, proc: Proc, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.alive(), f"the process ended (exit {proc.popen.returncode}) before {what}:\n{proc.output[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric_steps_raw(run: Path) -> list[int]:
    """Steps of the complete rows of metrics.jsonl, duplicates included, in file order."""
    try:
        data = (run / "metrics.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in data.split(b"\n")[:-1] if line.strip()]


def rows_written(cwd: Path) -> int:
    runs = list(cwd.glob("outputs/*/runs/*/metrics.jsonl"))
    return len(metric_steps_raw(runs[0].parent)) if runs else 0


def session(run: Path) -> dict:
    return json.loads((run / "session.json").read_text())


def latest_step(run: Path) -> int | None:
    try:
        return parse_step((run / "checkpoints" / LATEST_FILE).read_text().strip())
    except FileNotFoundError:
        return None


def manifest(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / checkpoint_name(step) / MANIFEST_FILE).read_text())


def train_log(run: Path) -> str:
    return (run / "train.log").read_text()


def assert_signal_stop(run: Path, proc: Proc, rc: int, sig: signal.Signals, rows_at_signal: int,
                       max_steps: int) -> int:
    """A graceful stop by ``sig``; returns the step it stopped at."""
    assert rc == 128 + sig, f"exit {rc}, expected {128 + sig}:\n{proc.output[-3000:]}"
    steps = metric_steps_raw(run)
    last = steps[-1]
    assert steps == list(range(1, last + 1)), steps  # a fresh run: every step once, in order
    assert rows_at_signal <= last < max_steps  # the signal landed mid-training
    # The checkpoint is at the last completed step: nothing to redo.
    assert latest_step(run) == last
    assert manifest(run, last)["reason"] == "signal"
    assert CheckpointStore(run / "checkpoints").verify(run / "checkpoints" / checkpoint_name(last)) == []
    s = session(run)
    assert s["status"] == "interrupted"
    assert s["global_step"] == last
    assert s["last_checkpoint"]["step"] == last and s["last_checkpoint"]["reason"] == "signal"
    assert Path(s["last_checkpoint"]["path"]).name == checkpoint_name(last)
    attempt = s["attempts"][-1]
    assert (attempt["status"], attempt["end_reason"], attempt["exit_code"]) == ("interrupted", sig.name, rc)
    assert attempt["pid"] == proc.pid
    assert f"stop requested by {sig.name}: saving at step {last}" in train_log(run)
    return last


def assert_resumed(run: Path, proc: Proc, step: int, reason: str) -> None:
    """train.log and the process output say where the run resumed from."""
    checkpoint = run.resolve() / "checkpoints" / checkpoint_name(step)
    line = f"resumed from step {step} (checkpoint {checkpoint}, reason {reason})"
    assert line in proc.output, proc.output[-3000:]
    assert line in train_log(run)


def assert_complete(run: Path, max_steps: int) -> None:
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    s = session(run)
    assert s["status"] == "completed" and s["global_step"] == max_steps
    # "end", or the cadence's reason when it had already saved the last step (no second write).
    assert s["last_checkpoint"]["step"] == max_steps and s["last_checkpoint"]["reason"] in ("end", "step", "time")
    assert (s["attempts"][-1]["status"], s["attempts"][-1]["end_reason"], s["attempts"][-1]["exit_code"]) == (
        "completed", "end", 0)
    assert (run / "final" / "adapter.safetensors").is_file()
    assert not (run / ".lock").exists()  # the holder record goes with the process


# ---------------------------------------------------------------------- signals


def test_sigint_then_sigusr1_each_save_the_last_step_and_the_rerun_loses_nothing(cli):
    """Two graceful stops in a row (one process each), then the same command finishes."""
    max_steps = 400
    stops: list[int] = []
    for sig in (signal.SIGINT, signal.SIGUSR1):
        proc = cli(f"max_steps={max_steps}", *SLOW, label=sig.name)
        already = rows_written(cli.cwd)
        wait_until(lambda already=already: rows_written(cli.cwd) >= already + 3, proc, "3 new metrics rows")
        rows_at_signal = rows_written(cli.cwd)
        sent = time.monotonic()
        proc.signal(sig)
        rc = proc.wait()
        latency = time.monotonic() - sent
        run = run_dir_of(cli.cwd)
        k = assert_signal_stop(run, proc, rc, sig, rows_at_signal, max_steps)
        assert latency < 30, latency  # one update + a small save + interpreter exit (~1.5 s here)
        if stops:
            assert_resumed(run, proc, stops[-1], "signal")
        stops.append(k)
    before = (run / "metrics.jsonl").read_bytes()

    # The same command (a lower max_steps, still above the stop, keeps it short) finishes.
    n = stops[-1] + 3
    last = cli(f"max_steps={n}", *SLOW, label="rerun")
    assert last.wait() == 0, last.output[-3000:]
    assert run_dir_of(cli.cwd) == run
    assert_resumed(run, last, stops[-1], "signal")
    assert_complete(run, n)
    # Appended, and a signal stop redoes nothing: every step exactly once in the raw file.
    assert (run / "metrics.jsonl").read_bytes().startswith(before)
    assert metric_steps_raw(run) == list(range(1, n + 1))
    attempts = session(run)["attempts"]
    assert [a["resumed_from_step"] for a in attempts] == [None, *stops]
    assert [a["exit_code"] for a in attempts] == [130, 138, 0]


def test_double_sigint_aborts_at_once_and_leaves_a_resumable_folder(cli):
    # A checkpoint every update, written in the background: the abort may land mid-write.
    overrides = ("checkpoint.every_steps=1", *SLOW)
    first = cli("max_steps=400", *overrides, label="double-sigint")
    wait_until(lambda: rows_written(cli.cwd) >= 4, first, "4 metrics rows")
    first.signal(signal.SIGINT)
    time.sleep(0.1)  # the handler has run (it resets SIGINT to the default action)
    first.signal(signal.SIGINT)
    rc = first.wait()
    # Killed by the second SIGINT (-2: mid-update, mid-save, or even in the interpreter's
    # teardown after a finished graceful stop), or - if both arrived before Python's handler
    # ran once - the graceful stop (130). Never a hang, never another code.
    assert rc in (-signal.SIGINT, 128 + signal.SIGINT), f"exit {rc}:\n{first.output[-3000:]}"
    run = run_dir_of(cli.cwd)
    store = CheckpointStore(run / "checkpoints")
    sound = [int(parse_step(p.name)) for p in store.list_checkpoints() if store.verify(p) == []]
    assert sound, "checkpoints every step: at least one must be committed"
    # Resume trusts LATEST when its target is sound (a kill between a folder's rename and the
    # LATEST update leaves one newer folder), else the newest sound one.
    newest = latest_step(run) if latest_step(run) in sound else max(sound)
    last_row = metric_steps_raw(run)[-1]
    assert newest <= last_row

    n = last_row + 3
    second = cli(f"max_steps={n}", *overrides, label="rerun")
    assert second.wait() == 0, second.output[-3000:]
    # That checkpoint is picked; anything half-written was removed, not loaded.
    reason = manifest(run, newest)["reason"]
    assert reason in ("step", "signal")
    assert_resumed(run, second, newest, reason)
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_complete(run, n)
    # Killed before it closed its attempt (the next one records it as killed), or after (the
    # graceful stop had finished and the second SIGINT ended the interpreter's teardown).
    a = session(run)["attempts"][0]
    assert (a["status"], a["end_reason"], a["exit_code"]) in (
        ("interrupted", "killed", None), ("interrupted", "SIGINT", 128 + signal.SIGINT))
    if rc > 0:
        assert a["exit_code"] == rc


# ---------------------------------------------------------------------- single writer


def test_a_second_process_on_a_live_run_is_refused_naming_the_holder(cli):
    first = cli("max_steps=10", label="holder")
    try:
        wait_until(lambda: rows_written(cli.cwd) >= 1, first, "the first metrics row")
        # Freeze the holder, so it is surely still running (and holding the lock) while the
        # rival starts - however slow this machine is. A stopped process is a live one.
        first.signal(signal.SIGSTOP)
        rival = cli("max_steps=10", label="rival")
        rc = rival.wait()
    finally:
        first.signal(signal.SIGCONT)
    assert rc == EXIT_LOCKED, f"exit {rc}:\n{rival.output[-3000:]}"
    assert f"is in use by pid {first.pid} on host " in rival.output
    assert rival.wall < 60  # refused at start-up, before building anything

    assert first.wait() == 0, first.output[-3000:]
    run = run_dir_of(cli.cwd)
    assert_complete(run, 10)
    # The refused process left no trace in the run's history.
    s = session(run)
    assert [a["pid"] for a in s["attempts"]] == [first.pid]
    assert sorted(p.name for p in (run / "attempts").iterdir()) == ["001"]
    assert metric_steps_raw(run) == list(range(1, 11))


# ---------------------------------------------------------------------- three attempts


def test_session_and_attempts_tell_three_attempts_sigterm_kill9_finish(cli):
    n = 30
    command = (f"max_steps={n}", "checkpoint.every_steps=4")
    gap = 3.0

    # 1. SIGTERM mid-run: graceful stop.
    first = cli(*command, label="sigterm")
    wait_until(lambda: rows_written(cli.cwd) >= 3, first, "3 metrics rows")
    rows_at_signal = rows_written(cli.cwd)
    sent = time.monotonic()
    first.signal(signal.SIGTERM)
    rc1 = first.wait()
    latency = time.monotonic() - sent
    run = run_dir_of(cli.cwd)
    k1 = assert_signal_stop(run, first, rc1, signal.SIGTERM, rows_at_signal, n)
    assert latency < 30, latency
    metrics_after_first = (run / "metrics.jsonl").read_bytes()
    time.sleep(gap)

    # 2. kill -9 after a new checkpoint and at least one more logged step: no handler runs,
    #    and the steps since that checkpoint will be redone.
    second = cli(*command, label="kill9")

    def past_a_new_checkpoint() -> bool:
        latest = latest_step(run)
        return latest is not None and latest > k1 and metric_steps_raw(run)[-1] > latest

    while True:
        wait_until(past_a_new_checkpoint, second, "a new checkpoint and a step past it")
        second.signal(signal.SIGSTOP)  # freeze, then make sure the condition still holds
        if past_a_new_checkpoint():
            break
        second.signal(signal.SIGCONT)
    second.signal(signal.SIGKILL)
    assert second.wait() == -signal.SIGKILL
    k2 = latest_step(run)  # what the kill left: the next attempt resumes from here
    redone = [s for s in metric_steps_raw(run) if s > k2]
    assert redone and k2 < n
    assert manifest(run, k2)["reason"] == "step"
    time.sleep(gap)

    # 3. The same command finishes the run.
    third = cli(*command, label="finish")
    assert third.wait() == 0, third.output[-3000:]
    assert run_dir_of(cli.cwd) == run
    assert_resumed(run, second, k1, "signal")
    assert_resumed(run, third, k2, "step")
    assert_complete(run, n)

    # metrics.jsonl kept every row (appended), and the reader keeps the last row per step.
    raw = metric_steps_raw(run)
    assert (run / "metrics.jsonl").read_bytes().startswith(metrics_after_first)
    assert len(raw) == n + len(redone)
    rows = read_metrics(run / "metrics.jsonl")
    lines = (run / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
    for step in redone:  # the row of the attempt that went on from that step is the one kept
        assert rows[step - 1] == json.loads(lines[len(raw) - 1 - raw[::-1].index(step)])

    s = session(run)
    attempts = s["attempts"]
    assert [a["index"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == ["interrupted", "interrupted", "completed"]
    assert [a["end_reason"] for a in attempts] == ["SIGTERM", "killed", "end"]
    assert [a["exit_code"] for a in attempts] == [143, None, 0]
    assert [a["resumed_from_step"] for a in attempts] == [None, k1, k2]
    assert [a["pid"] for a in attempts] == [first.pid, second.pid, third.pid]
    for a in attempts:
        assert a["host"] and a["code_version"] and a["started"] and a["ended"], a
    assert s["max_steps"] == n and s["config_identity"]

    # Active training time only: not the gaps, not start-up, not the steps lost to kill -9.
    walls = first.wall + second.wall + third.wall
    span = third.ended - first.started
    total = s["total_training_time"]
    assert 0 < total < walls, (total, walls)
    assert total < span - 2 * gap, (total, span)

    # Hydra rewrites .hydra/ on every start; attempts/NNN keeps each attempt's copy.
    assert sorted(p.name for p in (run / "attempts").iterdir()) == ["001", "002", "003"]
    for number in ("001", "002", "003"):
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            assert (run / "attempts" / number / name).is_file(), (number, name)
        assert f"max_steps={n}" in (run / "attempts" / number / "overrides.yaml").read_text()


# ---------------------------------------------------------------------- deadline


def test_max_wall_seconds_stops_in_time_with_a_deadline_checkpoint(cli):
    limit = 12
    # No cadence saves: the checkpoint at the stop is the deadline's own (a stop does not save a
    # step twice, so one landing on a cadence step would keep the cadence's reason).
    cadence = ("checkpoint=time", "checkpoint.every_seconds=3600")
    first = cli("max_steps=100000", f"max_wall_seconds={limit}", *cadence, label="deadline")
    rc = first.wait()
    assert rc == EXIT_DEADLINE, f"exit {rc}:\n{first.output[-3000:]}"
    run = run_dir_of(cli.cwd)
    k = metric_steps_raw(run)[-1]
    assert k > 0 and latest_step(run) == k
    assert manifest(run, k)["reason"] == "deadline"
    # The clock counts from the process start; the checkpoint is committed before the limit,
    # and the stop leaves ~1 s plus 1.5 x (slowest update + save) for the interpreter's exit
    # (~1 s, more on a loaded machine: hence the margin).
    assert manifest(run, k)["created_unix"] - first.started_wall < limit
    assert first.wall < limit + 3, first.wall
    s = session(run)
    assert s["status"] == "interrupted" and s["global_step"] == k
    assert s["last_checkpoint"]["step"] == k and s["last_checkpoint"]["reason"] == "deadline"
    assert (s["attempts"][0]["end_reason"], s["attempts"][0]["exit_code"]) == ("deadline", EXIT_DEADLINE)
    assert "stopping before max_wall_seconds" in train_log(run)

    # The same command with a lower max_steps (above the stop) continues from there.
    second = cli(f"max_steps={k + 3}", f"max_wall_seconds={limit}", *cadence, label="rerun")
    assert second.wait() == 0, second.output[-3000:]
    assert_resumed(run, second, k, "deadline")
    assert_complete(run, k + 3)
    assert metric_steps_raw(run) == list(range(1, k + 4))
    assert session(run)["attempts"][1]["resumed_from_step"] == k
