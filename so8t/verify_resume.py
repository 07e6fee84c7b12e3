"""``so8t-verify-resume``: does resume reproduce an uninterrupted run, on *your* config and machine?

::

    so8t-verify-resume [--updates N] [--keep DIR] [so8t-train overrides ...]

It runs ``so8t-train`` twice with your overrides, in temporary folders: N updates straight, and N
updates with a ``kill -9`` right after the checkpoint at update N/2 followed by a resume (the same
command, as a requeued job would). Then it compares the two end checkpoints part by part —
weights, optimizer, LR schedule, KL controller, sampler, gate schedule, counters, RNGs — and the
metrics rows, and prints for each: identical, or where it differs and by how much.

Only the checkpoint cadence (a save at N/2, written in the foreground so the kill lands right
after it) and the output folders are set for you; both are result-neutral. On a CUDA device the
runs use ``torch.use_deterministic_algorithms`` and the report says so: a difference that remains
is then in the state or the data order, not in a non-deterministic kernel.

Exit code 0 when everything is identical, 1 when something differs, 2 when a run could not be
made (a bad override: the message of so8t-train is shown).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from so8t.exit_codes import ExitCode

# What this command's codes mean: the shared OK / FAILED / REFUSED, read as a verdict.
EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_REFUSED = ExitCode.OK, ExitCode.FAILED, ExitCode.REFUSED
RUN_NAME = "verify"
# Wall-clock quantities: expected to differ between two runs, shown but never a failure.
TIMING_KEYS = ("training_time",)


def _train(args: list[str], out: Path, env: dict[str, str] | None = None, pause_file: Path | None = None):
    """Run so8t-train; with ``pause_file``, SIGKILL it once it paused after its first save."""
    cmd = [sys.executable, "-m", "so8t.train", *args, f"paths.output_dir={out}", f"run_name={RUN_NAME}",
           "output.progress_bars=false"]
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        if pause_file is not None:
            while not pause_file.exists() and proc.poll() is None:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()  # kill -9: no handler, no end save
        return proc.wait()
    finally:
        log.close()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _load_state(run: Path, step: int) -> dict[str, Any]:
    from so8t.checkpoint.state import unflatten_state
    from so8t.checkpoint.store import CheckpointStore, checkpoint_name

    store = CheckpointStore(run / "checkpoints")
    path = store.root / checkpoint_name(step)
    problems = store.verify(path)
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}")
    tensors, skeleton, _ = store.load(path)
    state = unflatten_state(skeleton, tensors)
    return {**{f"{name}": value for name, value in state["parts"].items()}, "rng": state["rng"]}


def compare(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences between two nested states, one line each (empty: identical)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"]
        if torch.equal(a, b):
            return []
        if a.is_floating_point():
            diff = (a.double() - b.double()).abs()
            return [f"{path}: {int((diff > 0).sum())} of {a.numel()} values differ, max |diff| {diff.max().item():.3g}"]
        return [f"{path}: {int((a != b).sum())} of {a.numel()} values differ"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [f"{path}: arrays differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one run" for k in sorted(set(a) ^ set(b), key=str)]
        for key in sorted(set(a) & set(b), key=str):
            out += compare(a[key], b[key], f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in compare(x, y, f"{path}[{i}]")]
    if a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        return []
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [f"{path}: {a!r} vs {b!r} (|diff| {abs(a - b):.3g})"]
    return [f"{path}: {a!r} vs {b!r}"]


def _metrics(run: Path) -> dict[int, dict]:
    from so8t.run.metrics import read_metrics

    return {row["step"]: {k: v for k, v in row.items() if not k.startswith("time/")}
            for row in read_metrics(run / "metrics.jsonl")}


def verdicts(straight: Path, resumed: Path, step: int) -> list[tuple[str, str, list[str]]]:
    """(part, verdict, detail lines) for every part of the end checkpoints and the metrics."""
    a, b = _load_state(straight, step), _load_state(resumed, step)
    rows = []
    for part in sorted(set(a) | set(b)):
        if part not in a or part not in b:
            rows.append((part, "DIFFERS", ["present in one run only"]))
            continue
        lines = compare(a[part], b[part], part)
        timing = [line for line in lines if any(f".{key}" in line.split(":")[0] for key in TIMING_KEYS)]
        real = [line for line in lines if line not in timing]
        verdict = "identical" if not real else "DIFFERS"
        if timing and not real:
            verdict = "identical (wall-clock time differs, as it should)"
        rows.append((part, verdict, real))
    ma, mb = _metrics(straight), _metrics(resumed)
    lines = [f"step {s}: only in one run" for s in sorted(set(ma) ^ set(mb))]
    lines += [line for s in sorted(set(ma) & set(mb)) for line in compare(ma[s], mb[s], f"step {s}")]
    rows.append(("metrics rows", "identical" if not lines else "DIFFERS", lines))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so8t-verify-resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=6, help="N: updates of each run (even, >= 2; default 6)")
    parser.add_argument("--keep", type=Path, default=None, help="keep both runs in this folder")
    parser.add_argument("overrides", nargs="*", help="so8t-train overrides, as you would run it")
    args = parser.parse_args(argv)
    if args.updates < 2 or args.updates % 2:
        parser.error("--updates must be an even number >= 2")
    blocked = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") in
               ("max_steps", "run_name", "paths.output_dir", "resume") or o.startswith(("-m", "--multirun"))]
    if blocked:
        parser.error(f"these are set by so8t-verify-resume itself: {' '.join(blocked)}")

    n, half = args.updates, args.updates // 2
    common = [*args.overrides, f"max_steps={n}", "checkpoint.cadence=step", f"checkpoint.every_steps={half}",
              "checkpoint.async_write=false", "checkpoint.save_on_end=true"]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="so8t-verify-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"SO8T_DETERMINISTIC": "1"}
    try:
        print(f"1/3 {n} updates straight ...", flush=True)
        code = _train(common, work / "straight", env)
        if code != ExitCode.OK:
            print(f"so8t-train failed (exit {code}):\n{_tail(work / 'straight.log')}", file=sys.stderr)
            return EXIT_REFUSED if code == ExitCode.REFUSED else EXIT_DIFFERENT
        pause = work / "paused"
        print(f"2/3 {half} updates, kill -9 right after the checkpoint at update {half} ...", flush=True)
        code = _train(common, work / "resumed",
                      {**env, "SO8T_PAUSE_AT": "save.latest_written@1", "SO8T_PAUSE_FILE": str(pause)}, pause)
        if not pause.exists():
            print(f"the run ended (exit {code}) before its checkpoint at update {half}:\n"
                  f"{_tail(work / 'resumed.log')}", file=sys.stderr)
            return EXIT_DIFFERENT
        print(f"3/3 resume to update {n} ...", flush=True)
        code = _train(common, work / "resumed", env)
        if code != ExitCode.OK:
            print(f"the resumed run failed (exit {code}):\n{_tail(work / 'resumed.log')}", file=sys.stderr)
            return EXIT_DIFFERENT
        straight, resumed = _run_dir(work / "straight"), _run_dir(work / "resumed")
        rows = verdicts(straight, resumed, n)
        _report(rows, straight, n, half)
        return EXIT_IDENTICAL if all(v.startswith("identical") for _, v, _ in rows) else EXIT_DIFFERENT
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"both runs kept in {work}")


def _run_dir(out: Path) -> Path:
    found = sorted(out.glob(f"*/runs/{RUN_NAME}"))
    if not found:
        raise SystemExit(f"no run folder under {out}")
    return found[0]


def _report(rows, straight: Path, n: int, half: int) -> None:
    device = _device_of(straight)
    print(f"\nresume check: {n} updates straight vs {half} + kill -9 + resume, your config")
    if device.startswith("cuda"):
        print("device: CUDA, with torch.use_deterministic_algorithms(True) in both runs")
    else:
        print(f"device: {device} (CPU kernels are deterministic)")
    width = max(len(r[0]) for r in rows)
    for part, verdict, lines in rows:
        print(f"  {part:<{width}}  {verdict}")
        for line in lines[:5]:
            print(f"  {'':<{width}}    {line}")
        if len(lines) > 5:
            print(f"  {'':<{width}}    ... and {len(lines) - 5} more")
    same = all(v.startswith("identical") for _, v, _ in rows)
    print("\nRESUME IS EXACT: the resumed run is the uninterrupted one." if same else
          "\nRESUME DIFFERS: see the parts above.")


def _device_of(run: Path) -> str:
    try:
        from omegaconf import OmegaConf

        device = str(OmegaConf.load(run / ".hydra" / "config.yaml").hardware.device)
    except Exception:  # noqa: BLE001 - only for the report's header line
        return "unknown"
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


if __name__ == "__main__":
    sys.exit(main())
