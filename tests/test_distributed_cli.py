"""Data-parallel runs through the real launcher: ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m so8t.train`` (torchrun), two CPU processes, gloo.

What is proved here:

* A 2-rank run completes: metrics are the group's (episodes counted once, both ranks log the
  same global figures), one checkpoint per step holding both ranks' RNG states, session.json,
  metrics, samples, train.log, .hydra and final/ from rank 0 only, rank 1 in train.rank1.log.
* SIGTERM to the launcher mid-run (it forwards it to both ranks): both ranks stop after the same
  update, one "signal" checkpoint at that step, every rank exits 143 (recorded in session.json)
  and so does the group: ``so8t-torchrun`` (torchrun ending with the group's status; plain
  torchrun ends with 1 after any rank's non-zero code); the same command resumes and ends with
  final tensors equal to the uninterrupted twin's.
* A lone process and a second group on a live run folder are refused with exit 3 on every
  rank; ``kill -9`` of one rank ends the group (status 137); the same command resumes from the
  last committed checkpoint and ends bit-exact to the twin.
* A 2-rank checkpoint resumed by one process is refused (exit 2) with what to do.
* SIGUSR1 to ``so8t-torchrun`` is forwarded to every rank (plain torchrun does not handle it):
  one checkpoint, status 138.
* Ranks that cannot stop are killed after torchrun's shutdown timeout: ``so8t-torchrun`` says 137.
* A Hydra sweep under torchrun runs each job as a 2-rank run; the same command skips them after.
* ``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath) starts the same group.

Kept as small as a run can be (tiny model, 8 episodes a step, 1 thread per rank): the twin,
shared by the tests, is 30 short updates.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from so8t.checkpoint.store import CheckpointStore, parse_step
from so8t.run.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name == "nt", reason="POSIX signals")]

TIMEOUT = 240  # per launch, generous for a loaded 2-core machine
MAX_STEPS = 30
# Two PPO epochs: every epoch's order is drawn up front and their token counts share a collective.
RUN = ("output.progress_bars=false", "hardware.num_threads=1", "ppo.rollout_batch_size=8",
       "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", f"max_steps={MAX_STEPS}", "checkpoint=step")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# torchrun itself, ending with the group's exit status instead of 1 (so8t/torchrun.py).
SO8T_TORCHRUN = (sys.executable, "-m", "so8t.torchrun", "--standalone", "--nproc_per_node", "2")


class Launch:
    """One launch (torchrun group or lone process), its output in a file."""

    def __init__(self, cwd: Path, args: list[str], label: str, shutdown_timeout: int = 30):
        self.out_path = cwd.parent / f"{cwd.name}-{label}.out"
        self._out = open(self.out_path, "w")  # noqa: SIM115 - closed in wait()
        self.started = time.monotonic()
        # How long torchrun waits for the ranks it signals before it kills them (its default: 30 s).
        env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1",
                   TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(shutdown_timeout))
        self.popen = subprocess.Popen(args, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None
        self._out.close()
        return rc

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def ranks(self) -> dict[int, psutil.Process]:
        """The worker processes torchrun started, by rank."""
        found = {}
        for child in psutil.Process(self.popen.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = child
        return found

    def kill_all(self) -> None:
        try:
            procs = [psutil.Process(self.popen.pid), *psutil.Process(self.popen.pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except psutil.Error:
                pass
        self.popen.wait()


@pytest.fixture
def launcher(tmp_path):
    launches: list[Launch] = []

    def start(cwd: Path, *overrides: str, ranks: int = 2, label: str = "run", shutdown_timeout: int = 30,
              via: tuple[str, ...] = TORCHRUN) -> Launch:
        cwd.mkdir(exist_ok=True)
        head = [*via[:-1], str(ranks)] if ranks > 1 else [sys.executable]
        given = {o.split("=", 1)[0] for o in overrides}
        base = [o for o in RUN if o.split("=", 1)[0] not in given]
        launch = Launch(cwd, [*head, "-m", "so8t.train", *base, *overrides], f"{len(launches) + 1}-{label}",
                        shutdown_timeout)
        launches.append(launch)
        return launch

    yield start
    for launch in launches:
        if launch.popen.poll() is None:
            launch.kill_all()


def run_dir_of(cwd: Path) -> Path:
    dirs = sorted(cwd.glob("outputs/*/runs/*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def wait_for(predicate, launch: Launch, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if launch.popen.poll() is not None:
            raise AssertionError(f"ended (rc {launch.popen.returncode}) before {what}:\n{launch.output[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{launch.output[-4000:]}")
        time.sleep(0.02)


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def final_tensors(run_dir: Path) -> dict:
    return {name: load_file(run_dir / "final" / name) for name in ("adapter.safetensors", "value_head.safetensors")}


def assert_same_final(run_dir: Path, twin_dir: Path) -> None:
    mine, twin = final_tensors(run_dir), final_tensors(twin_dir)
    for name in twin:
        assert mine[name].keys() == twin[name].keys()
        for key in twin[name]:
            assert mine[name][key].equal(twin[name][key]), f"{name}:{key} differs from the uninterrupted run"


def session_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "session.json").read_text())


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The uninterrupted 2-rank run, one checkpoint per step."""
    cwd = tmp_path_factory.mktemp("twin") / "work"
    cwd.mkdir()
    launch = Launch(cwd, [*TORCHRUN, "-m", "so8t.train", *RUN, "checkpoint.every_steps=1",
                          f"checkpoint.keep_last={MAX_STEPS}"], "twin")
    rc = launch.wait()
    assert rc == 0, launch.output[-4000:]
    return run_dir_of(cwd)


def test_two_ranks_complete_with_global_metrics_and_one_writer(twin):
    rows = read_metrics(twin / "metrics.jsonl")
    assert len((twin / "metrics.jsonl").read_text().splitlines()) == MAX_STEPS  # rank 0 wrote, once
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert [r["count/episodes"] for r in rows] == [8 * s for s in range(1, MAX_STEPS + 1)]  # the global batch
    # Both ranks log the same (global) figures: with their own sampling streams, their own
    # halves would differ.
    main_log, rank1_log = (twin / "train.log").read_text(), (twin / "train.rank1.log").read_text()
    def figures(log: str) -> list[str]:  # "step 3: reward 0.350 loss … clip 0.000", without the time
        return [line.split(" - ", 1)[1].rsplit(" (", 1)[0] for line in log.splitlines() if "] - step " in line]

    assert len(figures(main_log)) == MAX_STEPS
    assert figures(main_log) == figures(rank1_log)
    assert "rank 0 of 2" in main_log and "rank 1 of 2" not in main_log
    assert "rank 1 of 2" in rank1_log
    samples = [json.loads(line) for line in (twin / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [10] * 4 + [20] * 4 + [30] * 4

    store = CheckpointStore(twin / "checkpoints")
    steps = [parse_step(p.name) for p in store.list_checkpoints()]
    assert steps == list(range(1, MAX_STEPS + 1))  # one checkpoint per step for the group
    for path in store.list_checkpoints():
        assert store.verify(path) == []
        _tensors, skeleton, manifest = store.load(path)
        assert manifest["world_size"] == 2
        assert len(skeleton["rng"]["ranks"]) == 2  # every rank's RNG states
    session = session_of(twin)
    assert session["status"] == "completed" and session["global_step"] == MAX_STEPS
    assert [a["exit_code"] for a in session["attempts"]] == [0]
    assert (twin / "final" / "policy.json").exists() and (twin / ".hydra" / "config.yaml").exists()


def test_sigterm_to_torchrun_saves_one_step_and_the_rerun_matches_the_twin(twin, launcher, tmp_path):
    cwd = tmp_path / "work"
    group = launcher(cwd, "checkpoint.every_steps=1000", label="signalled", via=SO8T_TORCHRUN)
    wait_for(lambda: any(cwd.glob("outputs/*/runs/*")) and metric_rows(run_dir_of(cwd)) >= 3, group, "3 updates")
    group.popen.send_signal(signal.SIGTERM)
    # Plain torchrun's agent would raise the signal as an exception (status 1, a traceback).
    assert group.wait() == 143, group.output[-4000:]
    assert "Traceback" not in group.output and "SIGTERM received and forwarded to every rank" in group.output
    run_dir = run_dir_of(cwd)
    session = session_of(run_dir)
    attempt = session["attempts"][-1]
    assert (attempt["status"], attempt["end_reason"], attempt["exit_code"]) == ("interrupted", "SIGTERM", 143)
    store = CheckpointStore(run_dir / "checkpoints")
    saved = store.list_checkpoints()
    assert len(saved) == 1, saved  # one checkpoint for the group
    step = parse_step(saved[0].name)
    assert 3 <= step < MAX_STEPS and session["global_step"] == step
    assert store.load(saved[0])[2]["reason"] == "signal"
    assert metric_rows(run_dir) == step
    for log in ("train.log", "train.rank1.log"):  # every rank stopped after the same update
        assert f"saving at step {step}, then exiting with code 143" in (run_dir / log).read_text(), log

    again = launcher(cwd, "checkpoint.every_steps=1000", label="resumed")
    assert again.wait() == 0, again.output[-4000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, MAX_STEPS + 1))
    assert_same_final(run_dir, twin)


def test_so8t_torchrun_forwards_sigusr1_to_every_rank(launcher, tmp_path):
    """SLURM's warning before a time limit: plain torchrun does not handle SIGUSR1 (the signal
    would end it and leave its ranks running); so8t-torchrun forwards it like SIGTERM."""
    cwd = tmp_path / "work"
    group = launcher(cwd, "checkpoint.every_steps=1000", "max_steps=1000", label="usr1-launcher",
                     via=SO8T_TORCHRUN)
    wait_for(lambda: any(cwd.glob("outputs/*/runs/*")) and metric_rows(run_dir_of(cwd)) >= 2, group, "2 updates")
    ranks = group.ranks()
    group.popen.send_signal(signal.SIGUSR1)
    assert group.wait() == 138, group.output[-4000:]
    run_dir = run_dir_of(cwd)
    attempt = session_of(run_dir)["attempts"][-1]
    assert (attempt["end_reason"], attempt["exit_code"]) == ("SIGUSR1", 138)
    store = CheckpointStore(run_dir / "checkpoints")
    saved = store.list_checkpoints()
    assert len(saved) == 1 and store.load(saved[0])[2]["reason"] == "signal"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())


def test_so8t_torchrun_says_137_when_a_rank_had_to_be_killed_after_the_shutdown_timeout(launcher, tmp_path):
    """Ranks that cannot stop (here: suspended) are SIGKILLed by torchrun after its shutdown
    timeout; the launcher's status must not claim that they stopped on the signal."""
    cwd = tmp_path / "work"
    group = launcher(cwd, "checkpoint.every_steps=1000", "max_steps=1000", label="stuck", via=SO8T_TORCHRUN,
                     shutdown_timeout=2)
    wait_for(lambda: any(cwd.glob("outputs/*/runs/*")) and metric_rows(run_dir_of(cwd)) >= 1, group, "an update")
    ranks = group.ranks()
    for proc in ranks.values():
        proc.suspend()
    group.popen.send_signal(signal.SIGTERM)
    assert group.wait() == 137, group.output[-4000:]
    assert "a rank did not stop within the shutdown timeout and was killed; exit status 137" in group.output
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())


def test_a_live_group_refuses_rivals_and_kill_9_of_a_rank_resumes_bit_exact(twin, launcher, tmp_path):
    cwd = tmp_path / "work"
    group = launcher(cwd, "checkpoint.every_steps=2", label="killed", via=SO8T_TORCHRUN)
    wait_for(lambda: any(cwd.glob("outputs/*/runs/*")) and (run_dir_of(cwd) / "checkpoints" / "LATEST").exists()
             and metric_rows(run_dir_of(cwd)) >= 3, group, "a checkpoint")
    ranks = group.ranks()
    assert sorted(ranks) == [0, 1]
    for proc in ranks.values():  # hold the group still while rivals try the folder
        proc.suspend()
    lone = launcher(cwd, "checkpoint.every_steps=2", ranks=1, label="lone")
    assert lone.wait() == 3, lone.output[-4000:]
    assert f"pid {ranks[0].pid}" in lone.output
    rival = launcher(cwd, "checkpoint.every_steps=2", label="rival")
    rival.wait()
    rival_ranks = [line for line in rival.output.splitlines() if "is in use by" in line]
    assert len(rival_ranks) == 2, rival.output[-4000:]  # both ranks of the rival group refused
    assert "exitcode  : 3" in rival.output  # as torchrun reports its ranks' exit codes

    for proc in ranks.values():
        proc.resume()
    ranks[1].kill()  # kill -9 of one rank
    assert group.wait() == 137, group.output[-4000:]  # 128 + SIGKILL: rank 1 is the root cause
    assert "rank 1 failed first; exit status 137" in group.output
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
    run_dir = run_dir_of(cwd)
    committed = parse_step(CheckpointStore(run_dir / "checkpoints").read_latest())
    assert committed >= 2

    again = launcher(cwd, "checkpoint.every_steps=2", label="resumed")
    assert again.wait() == 0, again.output[-4000:]
    assert f"resumed from step {committed}" in (run_dir / "train.log").read_text()
    assert_same_final(run_dir, twin)


def test_one_process_refuses_a_two_rank_checkpoint(twin, launcher, tmp_path):
    cwd = tmp_path / "work"
    copy = cwd / twin.relative_to(twin.parents[3])
    shutil.copytree(twin, copy, ignore=shutil.ignore_patterns(".lock*"))
    lone = launcher(cwd, f"max_steps={MAX_STEPS + 5}", ranks=1, label="lone")
    assert lone.wait() == 2, lone.output[-4000:]
    assert "world_size=2" in lone.output and "--nproc_per_node=2" in lone.output
    assert "Traceback" not in lone.output
    assert parse_step(CheckpointStore(copy / "checkpoints").read_latest()) == MAX_STEPS  # nothing lost


def test_a_signal_to_one_rank_stops_the_whole_group_at_one_step(launcher, tmp_path):
    cwd = tmp_path / "work"
    group = launcher(cwd, "checkpoint.every_steps=1000", "max_steps=1000", label="usr1")
    wait_for(lambda: any(cwd.glob("outputs/*/runs/*")) and metric_rows(run_dir_of(cwd)) >= 3, group, "3 updates")
    group.ranks()[1].send_signal(signal.SIGUSR1)  # only rank 1 hears it
    assert group.wait() == 1  # plain torchrun: 1 for any rank's non-zero status
    run_dir = run_dir_of(cwd)
    attempt = session_of(run_dir)["attempts"][-1]
    assert (attempt["end_reason"], attempt["exit_code"]) == ("SIGUSR1", 138)
    saved = CheckpointStore(run_dir / "checkpoints").list_checkpoints()
    assert len(saved) == 1
    step = parse_step(saved[0].name)
    for log in ("train.log", "train.rank1.log"):
        assert f"stop requested by SIGUSR1: saving at step {step}, then exiting with code 138" in (
            run_dir / log).read_text(), log
    assert "exitcode  : 138" in group.output


def test_the_deadline_is_the_groups(launcher, tmp_path):
    cwd = tmp_path / "work"
    group = launcher(cwd, "checkpoint.every_steps=1000", "max_steps=100000", "max_wall_seconds=10",
                     label="deadline", via=SO8T_TORCHRUN)
    assert group.wait() == 75, group.output[-4000:]  # so8t-torchrun passes the ranks' status on
    assert "Traceback" not in group.output
    assert time.monotonic() - group.started < 60
    run_dir = run_dir_of(cwd)
    attempt = session_of(run_dir)["attempts"][-1]
    assert (attempt["end_reason"], attempt["exit_code"]) == ("deadline", 75)
    saved = CheckpointStore(run_dir / "checkpoints").list_checkpoints()
    assert len(saved) == 1 and CheckpointStore(run_dir / "checkpoints").load(saved[0])[2]["reason"] == "deadline"
    assert "exitcode  : 75" in group.output


def test_a_rank_that_stops_answering_fails_the_group_after_the_collective_timeout(launcher, tmp_path):
    cwd = tmp_path / "work"
    overrides = ("checkpoint.every_steps=2", "hardware.collective_timeout_s=4")
    # torchrun ends the silent rank once rank 0 failed: after 5 s rather than 30 it kills it.
    group = launcher(cwd, *overrides, "max_steps=1000", label="hung", shutdown_timeout=5)
    wait_for(lambda: any(cwd.glob("outputs/*/runs/*")) and (run_dir_of(cwd) / "checkpoints" / "LATEST").exists(),
             group, "a checkpoint")
    hung = group.ranks()[1]
    hung.suspend()  # alive but silent: only the timeout can end the wait
    stopped = time.monotonic()
    group.wait()
    assert time.monotonic() - stopped < 90
    run_dir = run_dir_of(cwd)
    log = (run_dir / "train.log").read_text()
    assert "rank 0 of 2 stopped" in log and "collective_timeout_s" in log
    attempt = session_of(run_dir)["attempts"][-1]
    assert (attempt["status"], attempt["exit_code"]) == ("failed", 1)
    assert not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE

    again = launcher(cwd, *overrides, "max_steps=6", label="resumed")  # the lock is free again
    assert again.wait() == 0, again.output[-4000:]
    assert "resumed from step" in (run_dir / "train.log").read_text()


def test_a_sweep_of_distributed_jobs_runs_each_on_the_group_and_a_rerun_skips_them(tmp_path):
    """``torchrun … -m so8t.train -m seed=1,2``: every rank runs the jobs in the same order, each
    job a 2-rank run in its own folder; the same command again finds both completed."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    sweep = [*TORCHRUN, "-m", "so8t.train", "-m", *(o for o in RUN if not o.startswith("max_steps=")),
             "max_steps=3", "seed=1,2"]
    first = Launch(cwd, sweep, "sweep")
    assert first.wait() == 0, first.output[-4000:]
    jobs = sorted(cwd.glob("outputs/default/sweeps/*/*/session.json"))
    assert [p.parent.name.rsplit(",", 1)[-1] for p in jobs] == ["seed=1", "seed=2"]
    for session in jobs:
        run_dir = session.parent
        assert (session_of(run_dir)["status"], session_of(run_dir)["global_step"]) == ("completed", 3)
        assert f"run dir: {run_dir}" in (run_dir / "train.rank1.log").read_text()  # rank 1 ran this job
        store = CheckpointStore(run_dir / "checkpoints")
        assert store.load(store.list_checkpoints()[-1])[2]["world_size"] == 2
    again = Launch(cwd, sweep, "sweep-again")
    assert again.wait() == 0, again.output[-4000:]
    assert again.output.count("run already completed") == 2  # both jobs (rank 1 prints only warnings)
    assert [len(session_of(p.parent)["attempts"]) for p in jobs] == [1, 1]  # nothing ran again


def test_accelerate_launch_starts_the_same_group(tmp_path):
    """``accelerate launch --multi_gpu`` runs torchrun underneath: the same environment, the
    same group (on CPU, gloo)."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    launch = Launch(cwd, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "so8t.train", *(o for o in RUN if not o.startswith("max_steps=")), "max_steps=2"],
                    "accelerate")
    assert launch.wait() == 0, launch.output[-4000:]
    run_dir = run_dir_of(cwd)
    assert "rank 0 of 2" in (run_dir / "train.log").read_text()
    assert "rank 1 of 2" in (run_dir / "train.rank1.log").read_text()
    assert [r["count/episodes"] for r in read_metrics(run_dir / "metrics.jsonl")] == [8, 16]
