"""Data-parallel scaling: 2 ranks x 1 thread against 1 rank x 1 thread, on the same global batch.

    python benchmarks/ddp_scaling.py [--rounds 3] [--steps 12] [--batches 64,128] [--no-write-results]

Both sides run SO8T's own trainer and checkpoint service, with the same config
(``ppo.rollout_batch_size`` and ``ppo.mini_batch_size`` are global, so both sides do the same
work per update), one checkpoint per update (``checkpoint=step every_steps=1``, background
writes): the 1-rank side as a plain process, the 2-rank side under the real launcher
(``python -m torch.distributed.run --standalone --nproc_per_node 2``, gloo), and a third side,
one process on half the global batch: one rank's share done alone, whose doubled episodes/s is
the most 2 ranks can reach (a forward on half the rows costs more than half: fixed costs per call,
and every call reads all the weights), so the table separates what strong scaling of this model
allows from what data parallelism itself costs. Each global batch of ``--batches`` gets its
own sides; they take turns for ``--rounds`` rounds, each a fresh launch; after 2 warm-up updates each worker
runs ``--steps`` timed iterations of the training loop's own sequence (so8t.recipe): the
boundary agreement on the stop and the deadline, the update, the boundary agreement on the
stop and the save (which carries every rank's RNG states), the checkpoint cadence's call
(``maybe_save``):

* episodes/s: global episodes / wall time of the timed iterations (updates, agreements and
  saves) — target: 2 ranks >= 1.7x one rank on 2 cores, and its bound (2 x the half-batch side);
* checkpoint stall: how long ``maybe_save`` keeps the training thread (the slowest rank's:
  the group waits for it at the next collective) — target <= 1.2x one rank's. The save's
  decision and hand-over travel in the agreement before it, which runs at every update whether
  or not a save is due: its time is reported next to the stall (and is in the episodes/s);
* collectives per update, per pair of boundary agreements and per save, counted by wrapping
  ``torch.distributed``'s collectives in the workers (independent of the machine's load).

Results go to the ``## Data-parallel scaling`` section of benchmarks/RESULTS.md (replaced in
place; other sections are left alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Data-parallel scaling"
ROOT = Path(__file__).resolve().parents[1]
MODELS = {"medium": "a random Phi-3 (hidden 256, 4 layers, intermediate 512; EOS unreachable, so every "
                     "response has the full length)", "tiny": "the embedded tiny model"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def overrides(batch: int, model_dir: str | None) -> list[str]:
    model = ["model=local", f"model.path={model_dir}"] if model_dir else []
    return [*model, "hardware.num_threads=1", f"ppo.rollout_batch_size={batch}", f"ppo.mini_batch_size={batch // 4}",
            "ppo.ppo_epochs=2", "checkpoint=step", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]


# ---------------------------------------------------------------------- worker


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "gather", "broadcast", "barrier", "scatter",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")


def count_collectives(counts: dict[str, int], seconds: dict[str, float], region: list[str]) -> None:
    """Count every collective by the region of the loop it ran in, and the time spent in them
    (the wait for the slower rank included). The object collectives
    (gather_object, broadcast_object_list, …) are made of these, looked up in the same module,
    so they count as the collectives they really run."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None:
            continue

        def counted(*a, _original=original, **k):
            counts[region[0]] = counts.get(region[0], 0) + 1
            began = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                seconds[region[0]] = seconds.get(region[0], 0.0) + time.perf_counter() - began

        setattr(c10d, name, counted)
        if getattr(dist, name, None) is original:
            setattr(dist, name, counted)


def worker(args) -> None:
    """One side: build the run as so8t.train does, time the training loop's sequence."""
    import torch
    from hydra import compose, initialize_config_dir

    from so8t.build import build_components
    from so8t.checkpoint import CheckpointService
    from so8t.config import CONF_DIR, register
    from so8t.config.identity import config_identity
    from so8t.config.validate import validate
    from so8t.distributed import AgreedDeadline, GroupStop, RankParts, join_group
    from so8t.run.clock import Deadline
    from so8t.run.signals import StopSignal

    counts: dict[str, int] = {}
    in_collectives: dict[str, float] = {}
    region = ["setup"]
    count_collectives(counts, in_collectives, region)
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose("train", overrides=overrides(args.batch, args.model_dir)))
    group = join_group(cfg.hardware)
    trainer = build_components(cfg, group).trainer
    service = CheckpointService(Path(args.run_dir), cfg.checkpoint, trainer.stateful_parts(), config_identity(cfg),
                                ranks=RankParts(group))
    service.resume("never")
    # The loop's own stop and deadline (no signal comes, no limit is set: they only agree).
    stop, deadline = GroupStop(StopSignal(), group), AgreedDeadline(Deadline(None, time.monotonic()), group)

    def iteration(times: dict[str, list[float]]) -> None:
        """One pass of so8t.recipe's loop: agree, update, agree, save if due."""
        t0 = time.perf_counter()
        region[0] = "boundary"
        stop.agree(deadline)
        deadline.next_step_would_overrun()
        t1 = time.perf_counter()
        region[0] = "update"
        trainer.train_step()
        t2 = time.perf_counter()
        region[0] = "boundary"
        stop.agree(checkpoints=service, step=trainer.counters.step)
        t3 = time.perf_counter()
        region[0] = "save"
        service.maybe_save(trainer.counters.step)
        t4 = time.perf_counter()
        region[0] = "other"
        times["step"].append(t2 - t1)
        times["agree"].append(t1 - t0 + t3 - t2)
        times["stall"].append(t4 - t3)

    for _ in range(2):  # warm-up: first-call costs, snapshot buffers allocated
        iteration({"step": [], "agree": [], "stall": []})
    group.barrier()
    counts.clear()
    in_collectives.clear()
    times: dict[str, list[float]] = {"step": [], "agree": [], "stall": []}
    began, cpu_began = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        iteration(times)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    per_update = {key: counts.get(key, 0) / args.steps for key in ("update", "boundary", "save")}
    update_in_collectives = in_collectives.get("update", 0.0) / args.steps
    service.close()
    # The slowest rank's figures are the group's.
    worst = group.gather_to_main({"wall": wall, "cpu": cpu, "in_collectives": update_in_collectives,
                                  **{k: statistics.median(v) for k, v in times.items()}})
    if group.is_main:
        assert worst is not None  # rank 0 holds every rank's figures
        print("BENCH_RESULT " + json.dumps({
            "world_size": group.world_size,
            "episodes": args.steps * cfg.ppo.rollout_batch_size,
            "wall": max(w["wall"] for w in worst),
            "stall": max(w["stall"] for w in worst),
            "agree": max(w["agree"] for w in worst),
            "step": max(w["step"] for w in worst),
            "in_collectives": max(w["in_collectives"] for w in worst),  # per update, inside the update
            "cpu": sum(w["cpu"] for w in worst),  # CPU seconds of all ranks together
            "collectives": per_update,  # rank 0's; every rank runs the same ones
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }), flush=True)


# ---------------------------------------------------------------------- driver


def launch(ranks: int, args, folder: Path) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"ddp{ranks}-", dir=folder)
    head = TORCHRUN if ranks > 1 else [sys.executable]
    cmd = [*head, str(Path(__file__).resolve()), "--worker", "--run-dir", run_dir,
           "--steps", str(args.steps), "--batch", str(args.batch)]
    if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"{ranks}-rank worker failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def load_average() -> str:
    try:
        return "%.2f" % os.getloadavg()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="launches of each side (medians)")
    parser.add_argument("--steps", type=int, default=12, help="timed updates per launch")
    parser.add_argument("--batches", default="64,128",
                        help="global rollout batches, comma-separated (mini-batch: a quarter of each)")
    parser.add_argument("--no-write-results", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--model", choices=("medium", "tiny"), default="medium",
                        help="medium: a random Phi-3 of hidden 256, 4 layers (ppo_throughput.py's medium); "
                             "tiny: the embedded tiny model, whose updates are bound by per-call overhead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # the worker's global batch
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    if any(b % 8 for b in batches):
        parser.error("each batch must be a multiple of 8 (a quarter of it is split over 2 ranks)")

    # Per global batch B, three sides: 1 rank on B, 2 ranks on B, and 1 rank on B/2 — the work of
    # one of the two ranks done alone, which bounds what 2 ranks can reach (2x its episodes/s).
    sides = (("1 rank", 1, 1), ("2 ranks", 2, 1), ("1 rank, half batch", 1, 2))
    started, loads = time.monotonic(), []
    results: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.model == "medium":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from ppo_throughput import build_model_dir

            args.model_dir = str(Path(folder) / "model")
            build_model_dir("medium", Path(args.model_dir))
        for batch in batches:
            for round_index in range(args.rounds):
                order = sides[round_index % 3:] + sides[:round_index % 3]  # rotate, so drift hits every side
                for name, ranks, divisor in order:
                    loads.append(load_average())
                    args.batch = batch // divisor
                    r = launch(ranks, args, Path(folder))
                    results.setdefault((batch, name), []).append(r)
                    print(f"batch {batch}, round {round_index + 1}: {name}: {r['episodes'] / r['wall']:.1f} "
                          f"episodes/s, stall {1000 * r['stall']:.2f} ms, agreements {1000 * r['agree']:.2f} ms, "
                          f"collectives {r['collectives']}", flush=True)

    def med(batch: int, side: str, key) -> float:
        return statistics.median(key(r) for r in results[(batch, side)])

    def eps(r: dict) -> float:
        return r["episodes"] / r["wall"]

    first = batches[0]
    counts = results[(first, "2 ranks")][0]["collectives"]  # the same in every launch and at every batch
    threads = {n: results[(first, n)][0]["threads"] for n in ("1 rank", "2 ranks")}
    cmd = "python benchmarks/ddp_scaling.py" + (f" --model {args.model}" if args.model != "medium" else "") + (
        f" --rounds {args.rounds}" if args.rounds != 3 else "") + (f" --steps {args.steps}" if args.steps != 12 else "") + (
        f" --batches {args.batches}" if args.batches != "64,128" else "")
    lines = [
        SECTION,
        "",
        f"`{cmd}` — {dt.date.today().isoformat()}, {time.monotonic() - started:.0f} s wall.",
        "",
        f"- Machine: {platform.platform()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {results[(first, '1 rank')][0]['torch']}; 1-minute load average before each launch: {', '.join(loads)}.",
        f"- Work: {MODELS[args.model]} with SO(8) adapters, global rollout batches {', '.join(map(str, batches))} "
        "(mini-batch: a quarter), 2 PPO epochs, 12 new tokens; one checkpoint per update (background write). "
        f"Medians over {args.rounds} launches per side (rotating order), {args.steps} timed updates each after "
        "2 warm-up updates.",
        f"- 2 ranks: `torchrun --standalone --nproc_per_node 2`, gloo, {threads['2 ranks']} torch thread per rank "
        f"({threads['1 rank']} on the 1-rank sides); each rank samples and trains on half of every global batch; "
        "gradients and statistics are summed over the ranks.",
        "- 1 rank, half batch: one process on half the global batch (rollout and mini-batch), the work of one of the "
        "two ranks without the other: twice its episodes/s is what 2 ranks would reach if data parallelism cost "
        "nothing (the bound). The bound is below 2x because a forward or backward on half the rows takes more than "
        "half the time (fixed costs per call; every call reads all the weights); what the group loses to the bound "
        "is data parallelism's own cost (collectives, waiting for the slower rank, two processes at once).",
        "- Each timed iteration is the training loop's (so8t.recipe): agree on the stop and the deadline, update, "
        "agree on the stop and the save (with every rank's RNG states), `maybe_save`. The stall is `maybe_save`; "
        "agreements are both agreements of an iteration, the wait for the slower rank included. \"In the update's "
        "collectives\": the time a rank spends inside the update's collectives (gradient sums, statistics) per update, "
        "waiting for the other rank included (the slower rank's figure).",
        "- episodes/CPU-s divides by the CPU time of all ranks together; its ratio is the parallel efficiency in work.",
        "",
        "| global batch | side | episodes/s | episodes/CPU-s | update (median) | in the update's collectives "
        "| checkpoint stall (median) | agreements (median) | episodes/s per launch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for batch in batches:
        for name, _ranks, divisor in sides:
            rs = results[(batch, name)]
            lines.append(
                f"| {batch // divisor} | {name} | {med(batch, name, eps):.1f} "
                f"| {med(batch, name, lambda r: r['episodes'] / r['cpu']):.1f} "
                f"| {1000 * med(batch, name, lambda r: r['step']):.0f} ms "
                f"| {1000 * med(batch, name, lambda r: r['in_collectives']):.0f} ms "
                f"| {1000 * med(batch, name, lambda r: r['stall']):.2f} ms "
                f"| {1000 * med(batch, name, lambda r: r['agree']):.2f} ms | {', '.join(f'{eps(r):.1f}' for r in rs)} |")
    lines += [
        "",
        "| collectives (2 ranks, per iteration) | count |",
        "|---|---:|",
        f"| in the update (statistics, gradient sums) | {counts['update']:g} |",
        f"| in the two boundary agreements | {counts['boundary']:g} |",
        f"| in the save (`maybe_save`, a checkpoint every update) | {counts['save']:g} |",
        "",
        "| global batch | episodes/s, 2 ranks / 1 rank (target >= 1.7x) | bound (2 x half batch / 1 rank) "
        "| 2 ranks / bound | episodes/CPU-s, 2 ranks / 1 rank | checkpoint stall, 2 ranks / 1 rank (target <= 1.2x) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in batches:
        one, two, half = (med(batch, n, eps) for n in ("1 rank", "2 ranks", "1 rank, half batch"))
        cpu_two, cpu_one = (med(batch, n, lambda r: r["episodes"] / r["cpu"]) for n in ("2 ranks", "1 rank"))
        stall_two, stall_one = (med(batch, n, lambda r: r["stall"]) for n in ("2 ranks", "1 rank"))
        speedup, stall_ratio = two / one, stall_two / stall_one
        lines.append(
            # Three decimals: 1.697 is "not met" and must not print as 1.70.
            f"| {batch} | {speedup:.3f}x ({'met' if speedup >= 1.7 else 'not met'}) | {2 * half / one:.3f}x "
            f"| {two / (2 * half):.3f} | {cpu_two / cpu_one:.3f}x "
            f"| {stall_ratio:.3f}x ({'met' if stall_ratio <= 1.2 else 'not met'}) |")
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write_results:
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = pattern.sub(lambda _m: text + "\n\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
        RESULTS.write_text(new.rstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
