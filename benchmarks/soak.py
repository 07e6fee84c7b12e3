"""Soak test: many random ``kill -9`` against an uninterrupted twin.

    python benchmarks/soak.py --kills 200 [--max-steps 12] [--seed 0] [--keep DIR]

One uninterrupted ``so8t-train`` run (the twin) is made first. Then the same command is run
again and again in fresh folders, each attempt killed with SIGKILL at a random moment — half of
the kills at a random instant once the attempt has made progress, half exactly inside a random
phase of a checkpoint save (the pause points of so8t.run.faults) — and re-run (as a requeued job
would) until the run completes; then the next run starts, until ``--kills`` kills were sent.

Printed (and written to ``--table FILE`` when given), one row each:

* kills — SIGKILLs delivered;
* corrupt loads — checkpoints a resume had to reject (a kill must never leave a committed one
  damaged);
* failed resumes — attempts after a kill that exited non-zero (other than by the next kill) or
  started from scratch although a checkpoint was committed;
* steps redone — updates trained again after a resume (the price of the kills: the steps since
  the last checkpoint), in all and per kill;
* final tensors identical — completed runs whose ``final/`` tensors equal the twin's, bit for bit.

The peer in the same run is the twin: every completed run is compared with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from so8t.run.faults import PAUSE_POINTS  # noqa: E402

ARGS = ["output.progress_bars=false", "run_name=soak", "checkpoint=step", "checkpoint.every_steps=2",
        "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1", "hardware.num_threads=1"]


def _run_dir(cwd: Path) -> Path:
    return cwd / "outputs" / "default" / "runs" / "soak"


def _rows(run: Path) -> list[int]:
    """Steps of every metrics row written, redone ones included (the raw file, not read_metrics)."""
    try:
        lines = (run / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            pass
    return steps


def _committed(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any((p / "MANIFEST.json").is_file() for p in root.glob("step_*"))


def _final_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in ("adapter.safetensors", "value_head.safetensors"):
        for key, value in load_file(run / "final" / name).items():
            out[f"{name}:{key}"] = value
    return out


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def attempt(cwd: Path, max_steps: int, rng: random.Random, kill: bool) -> tuple[int, str]:
    """One attempt; killed at a random moment when ``kill``. Returns (exit code, how it ended)."""
    run = _run_dir(cwd)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    how = "ran to its end"
    marker = cwd / "paused"
    marker.unlink(missing_ok=True)
    mode = rng.choice(["time", "pause"]) if kill else None
    if mode == "pause":
        point = rng.choice(PAUSE_POINTS)
        env.update(SO8T_PAUSE_AT=f"{point}@{rng.randint(1, 2)}", SO8T_PAUSE_FILE=str(marker))
        how = f"killed in {point}"
    log = open(cwd / "attempts.log", "ab")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen([sys.executable, "-m", "so8t.train", *ARGS, f"max_steps={max_steps}"], cwd=cwd,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        if mode == "time":
            start_rows = len(_rows(run))
            while proc.poll() is None and len(_rows(run)) <= start_rows:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.8))
            how = "killed at a random instant"
        elif mode == "pause":
            while proc.poll() is None and not marker.exists():
                time.sleep(0.02)
        if kill and proc.poll() is None:
            proc.kill()
            proc.wait()
            return -9, how
        return proc.wait(), "ran to its end" if proc.returncode == 0 else f"exited {proc.returncode}"
    finally:
        log.close()


def soak(kills: int, max_steps: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    twin_dir = work / "twin"
    twin_dir.mkdir(parents=True)
    code, _ = attempt(twin_dir, max_steps, rng, kill=False)
    if code != 0:
        raise SystemExit(f"the uninterrupted twin failed (exit {code}); see {twin_dir / 'attempts.log'}")
    twin = _final_tensors(_run_dir(twin_dir))

    stats = {"kills": 0, "corrupt_loads": 0, "failed_resumes": 0, "steps_redone": 0, "runs_completed": 0,
             "runs_identical": 0, "attempts": 0}
    number = 0
    while stats["kills"] < kills:
        number += 1
        cwd = work / f"run{number:03d}"
        cwd.mkdir()
        killed_before = False
        while True:
            had_checkpoint = _committed(_run_dir(cwd))
            log_before = _log_len(cwd)
            want_kill = stats["kills"] < kills
            code, how = attempt(cwd, max_steps, rng, kill=want_kill)
            stats["attempts"] += 1
            text = _log_since(cwd, log_before)
            stats["corrupt_loads"] += text.count("Rejected checkpoint")
            if killed_before and (("starting fresh" in text and had_checkpoint) or code not in (0, -9)):
                stats["failed_resumes"] += 1
            if code == -9:
                stats["kills"] += 1
                killed_before = True
                print(f"  kill {stats['kills']:>4}/{kills}: run {number}, {how}", flush=True)
                continue
            if code != 0:
                print(f"  run {number}: attempt exited {code}; see {cwd / 'attempts.log'}", flush=True)
                stats["failed_resumes"] += 0 if killed_before else 1
                break
            # Completed (possibly without being killed, if the kills ran out).
            run = _run_dir(cwd)
            steps = _rows(run)
            stats["steps_redone"] += len(steps) - len(set(steps))
            stats["runs_completed"] += 1
            stats["runs_identical"] += _same(_final_tensors(run), twin)
            break
        shutil.rmtree(cwd, ignore_errors=True)
    return stats


def _log_len(cwd: Path) -> int:
    path = _run_dir(cwd) / "train.log"
    return path.stat().st_size if path.exists() else 0


def _log_since(cwd: Path, offset: int) -> str:
    path = _run_dir(cwd) / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def table(stats: dict, command: str) -> str:
    per_kill = stats["steps_redone"] / stats["kills"] if stats["kills"] else 0.0
    return "\n".join([
        f"`{command}`",
        "",
        "| kills | corrupt loads | failed resumes | steps redone (per kill) | final tensors identical |",
        "|---|---|---|---|---|",
        f"| {stats['kills']} | {stats['corrupt_loads']} | {stats['failed_resumes']} | "
        f"{stats['steps_redone']} ({per_kill:.2f}) | {stats['runs_identical']} of {stats['runs_completed']} runs |",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=12, help="updates per run (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--table", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="so8t-soak-"))
    command = f"python benchmarks/soak.py --kills {args.kills} --max-steps {args.max_steps} --seed {args.seed}"
    began = time.monotonic()
    try:
        stats = soak(args.kills, args.max_steps, args.seed, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    out = table(stats, command)
    print(f"\n{out}\n\n{stats['attempts']} attempts in {time.monotonic() - began:.0f} s")
    if args.table:
        args.table.write_text(out + "\n", encoding="utf-8")
    bad = stats["corrupt_loads"] or stats["failed_resumes"] or stats["runs_identical"] != stats["runs_completed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
