"""What a checkpoint costs, on a configuration whose trainable state is >= 100 MB.

    python benchmarks/checkpoint_cost.py [--repeats 3] [--no-write-results]

The model is a wider, deeper tiny Phi-3 (random weights, built in code) with LoRA of a large
rank on every linear layer: SO(8) adapters hold 28 parameters per block of 8 hidden units, so
even a very wide model has kilobytes of them; LoRA is the practical way to reach 100 MB of
trainable weights. The checkpointed parts are what a PPO run saves: the trainable weights
(LoRA + value head, through the trainer's ``TrainableWeights``) and an AdamW optimizer after
one step (so its two moments exist and the optimizer state is twice the weights).

Measured, each the median of ``--repeats`` repetitions:

(a) bytes of one checkpoint on disk against the bytes of the trainable state (weights + Adam
    moments, which is what resuming needs) — target <= 1.05x;
(b) the training stall per checkpoint: the time ``maybe_save`` keeps the training thread with
    ``async_write=true``, against a synchronous write (``async_write=false``) and against
    ``save_pretrained`` of the whole model (what the replaced system did) — target: the async
    stall is <= 10 % of the synchronous write. Also shown: the extra time of training steps that
    run while the background write is in flight (GIL and memory-bandwidth contention);
(c) time to the first finished training step of a resumed run against a fresh run (build the
    model + [verify and load the checkpoint] + one forward/backward/optimizer step).

Results go to the ``## Checkpoint cost`` section of benchmarks/RESULTS.md (replaced in place;
other sections are left alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Checkpoint cost"

# The benchmark model: ~67 M frozen parameters (268 MB fp32), LoRA r=320 on every linear
# layer of the decoder: ~26 M trainable parameters (105 MB), ~315 MB with the Adam moments.
MODEL = dict(hidden_size=1024, num_layers=4, num_heads=16, intermediate_size=4096, max_position_embeddings=64)
LORA = SimpleNamespace(kind="lora", r=320, alpha=320.0, dropout=0.0,
                       target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
BATCH, SEQ = 2, 8


def checkpoint_cfg(async_write: bool) -> SimpleNamespace:
    return SimpleNamespace(cadence="step", every_seconds=None, every_steps=1, keep_last=2, keep_every_steps=None,
                           save_on_end=True, async_write=async_write, max_failed_saves=5, max_unprotected=3.0)


IDENTITY = {**{f"model.{k}": v for k, v in MODEL.items()}, "adapter.kind": "lora", "adapter.r": LORA.r}


# ---------------------------------------------------------------------- the run being checkpointed


def build(seed: int = 0):
    """Base model, policy, optimizer and the parts a PPO run checkpoints."""
    from transformers import Phi3ForCausalLM

    from so8t.model.policy import build_policy
    from so8t.model.tiny import build_tiny_config
    from so8t.ppo.trainer import TrainableWeights

    torch.manual_seed(seed)
    base = Phi3ForCausalLM(build_tiny_config(**MODEL))
    policy = build_policy(base, LORA)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    parts = {"weights": TrainableWeights(policy), "optimizer": optimizer}
    return base, policy, optimizer, parts


def train_step(policy, optimizer, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, policy.base.config.vocab_size, (BATCH, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    out = policy(ids, mask)
    loss = out.logits.float().logsumexp(-1).mean() + out.values.pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def state_bytes(policy, optimizer) -> tuple[int, int]:
    """(trainable weights, optimizer tensors) in bytes."""
    weights = sum(t.numel() * t.element_size() for t in policy.trainable_state_dict().values())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return weights, moments


# ---------------------------------------------------------------------- measurements


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def heartbeat(keep_going, tick: float = 0.001, late: float = 0.005) -> float:
    """Sleep ``tick`` at a time while ``keep_going()``; return the total lateness of the
    wake-ups that came more than ``late`` after they were due (time kept from running)."""
    blocked = 0.0
    last = time.perf_counter()
    while keep_going():
        time.sleep(tick)
        now = time.perf_counter()
        if now - last - tick > late:
            blocked += now - last - tick
        last = now
    return blocked


def measure_saves(work: Path, policy, optimizer, parts, repeats: int) -> dict:
    from so8t.checkpoint import CheckpointService

    out: dict = {"async_stall": [], "async_write": [], "sync": [], "pretrained": [], "size": [],
                 "blocked": [], "blocked_idle": []}

    # Async: the stall is the maybe_save call; the write goes on in the background. Each save
    # starts with no write in flight (the cadence is longer than a write). A second save per
    # repetition runs a heartbeat on the training thread while its write is in flight: how
    # long is that thread kept from running Python (the GIL held by the writer)? The same
    # heartbeat with no write is the baseline noise. (The heartbeat itself slows the writer
    # down, by GIL hand-offs, so the write time is taken from the first save.)
    service = CheckpointService(work / "async", checkpoint_cfg(True), parts, IDENTITY)
    service.resume("never")
    for i in range(repeats):
        began = time.perf_counter()
        path = service.maybe_save(2 * i + 1)
        out["async_stall"].append(time.perf_counter() - began)
        assert path is not None and service.wait() is None
        out["async_write"].append(time.perf_counter() - began)
        out["size"].append(service.store.size_of(path))

        began = time.perf_counter()
        service.maybe_save(2 * i + 2)
        out["async_stall"].append(time.perf_counter() - began)
        out["blocked"].append(heartbeat(lambda: service.writer.busy))
        assert service.wait() is None
        until = time.perf_counter() + out["async_write"][-1]
        out["blocked_idle"].append(heartbeat(lambda until=until: time.perf_counter() < until))
    service.close()

    service = CheckpointService(work / "sync", checkpoint_cfg(False), parts, IDENTITY)
    service.resume("never")
    for i in range(repeats):
        began = time.perf_counter()
        path = service.maybe_save(i + 1)
        out["sync"].append(time.perf_counter() - began)
        assert path is not None
    service.close()

    for i in range(repeats):
        target = work / f"pretrained-{i}"
        began = time.perf_counter()
        policy.base.save_pretrained(target)
        out["pretrained"].append(time.perf_counter() - began)
        out["pretrained_bytes"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        shutil.rmtree(target)
    return out


def measure_start(checkpoint: Path, repeats: int) -> dict:
    """Fresh: build + one step. Resumed: build + verify/load the checkpoint + one step."""
    from so8t.checkpoint import CheckpointService

    out: dict = {"fresh": [], "resumed": [], "resume_call": []}
    for i in range(repeats):
        for kind in ("fresh", "resumed"):
            began = time.perf_counter()
            _, policy, optimizer, parts = build(seed=1)
            if kind == "resumed":
                service = CheckpointService(checkpoint.parent.parent / "probe", checkpoint_cfg(False), parts, IDENTITY)
                before = time.perf_counter()
                result = service.resume(checkpoint)
                out["resume_call"].append(time.perf_counter() - before)
                assert result is not None and result.step > 0
            train_step(policy, optimizer, 3000 + i)
            out[kind].append(time.perf_counter() - began)
            del policy, optimizer, parts
    return out


# ---------------------------------------------------------------------- report


def machine() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs "
            f"(torch threads {torch.get_num_threads()}), Python {platform.python_version()}, torch {torch.__version__}")


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def report(sizes: dict, saves: dict, start: dict, repeats: int, elapsed: float, work: Path) -> str:
    weights, moments = sizes["weights"], sizes["moments"]
    state = weights + moments
    on_disk = median(saves["size"])
    stall, write, sync = median(saves["async_stall"]), median(saves["async_write"]), median(saves["sync"])
    pretrained = median(saves["pretrained"])
    fresh, resumed = median(start["fresh"]), median(start["resumed"])
    blocked, blocked_idle = median(saves["blocked"]), median(saves["blocked_idle"])
    size_ok = on_disk <= 1.05 * state
    stall_ok = stall <= 0.10 * sync
    rows = [
        ("(a) bytes per checkpoint on disk", f"{on_disk / 1e6:.1f} MB",
         f"{on_disk / state:.4f}x the trainable state ({state / 1e6:.1f} MB)", "<= 1.05x", size_ok),
        ("(b) training stall per checkpoint, async_write=true", fmt_s(stall),
         f"{stall / sync:.1%} of the sync write; {stall / pretrained:.1%} of save_pretrained", "<= 10 % of sync",
         stall_ok),
        ("    the run's first save (snapshot buffers allocated)", fmt_s(saves["async_stall"][0]),
         f"{saves['async_stall'][0] / sync:.1%} of the sync write", "", None),
        ("    background write (off the training thread)", fmt_s(write), f"{write / sync:.2f}x the sync write", "",
         None),
        ("    training thread kept from Python during a write", fmt_s(blocked),
         f"heartbeat lateness; {fmt_s(blocked_idle)} with no write in flight", "", None),
        ("    synchronous write, async_write=false", fmt_s(sync), "1.00x", "", None),
        ("    save_pretrained of the whole model", fmt_s(pretrained),
         f"{pretrained / sync:.2f}x the sync write; {saves['pretrained_bytes'] / 1e6:.1f} MB on disk", "", None),
        ("(c) first step, fresh run (build + step)", fmt_s(fresh), "1.00x", "", None),
        ("    first step, resumed run (build + resume + step)", fmt_s(resumed),
         f"{resumed / fresh:.2f}x; +{fmt_s(resumed - fresh)} (resume() alone: {fmt_s(median(start['resume_call']))})",
         "", None),
    ]
    head = ("| measure | median | ratio | target | met |", "|---|---:|---|---|---|")
    table = [*head, *(f"| {a} | {b} | {c} | {d} | {'' if e is None else ('yes' if e else 'NO')} |"
                      for a, b, c, d, e in rows)]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/checkpoint_cost.py` — {dt.date.today().isoformat()}, median of {repeats} "
        f"repetitions ({2 * repeats} saves for the async stall), {elapsed:.0f} s wall.",
        "",
        f"- Machine: {machine()}.",
        f"- Checkpoints written to `{work.parent}` (`{_filesystem(work)}`).",
        f"- Model: Phi-3 architecture, random weights, hidden {MODEL['hidden_size']}, {MODEL['num_layers']} "
        f"layers, intermediate {MODEL['intermediate_size']}: {sizes['base_params'] / 1e6:.1f} M frozen parameters "
        f"({sizes['base_bytes'] / 1e6:.0f} MB fp32).",
        f"- Trainable: LoRA r={LORA.r} on {', '.join(LORA.target_modules)} + value head = "
        f"{weights / 4e6:.1f} M parameters, {weights / 1e6:.1f} MB; AdamW moments (after one step) "
        f"{moments / 1e6:.1f} MB; trainable state (what a checkpoint must hold) {state / 1e6:.1f} MB. SO(8) "
        "adapters have 28 parameters per 8 hidden units, so LoRA is the practical way to reach 100 MB.",
        "- A checkpoint also holds every RNG state, the optimizer's hyper-parameters (state.json) and the "
        "manifest; each file is fsynced, hashed (sha256) and committed by rename. `save_pretrained` "
        "(the replaced system) writes the whole model, synchronously, without fsync or hashes.",
        "- The async stall is the in-memory snapshot: a copy of the state into the previous snapshot's "
        "buffers, bound by memory bandwidth. Serialising, hashing and fsync run in the writer thread and "
        "release the GIL (the tensors are streamed to the file, not built into one bytes object first); "
        "the heartbeat row is how late a 1 ms sleep loop on the training thread woke up while the write "
        "was in flight (GIL + CPU contention), next to the same loop with no write.",
        "- (c) builds the model in code (random init) rather than loading it from disk; the extra time of a "
        "resumed start is `resume()`: verify (sha256) + read + load the parts + restore the RNGs.",
        "",
        *table,
        "",
    ]
    return "\n".join(lines)


def _filesystem(path: Path) -> str:
    try:
        usage = shutil.disk_usage(path)
        return f"{usage.total / 1e9:.0f} GB file system"
    except OSError:
        return "?"


def write_section(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _m: text + "\n", old)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per measure (median; >= 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, as conf/hardware/cpu.yaml sets)")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temporary folder)")
    parser.add_argument("--no-write-results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    import logging
    import warnings

    import transformers

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="so8t-ckpt-bench-", dir=args.dir))
    try:
        base, policy, optimizer, parts = build(seed=0)
        train_step(policy, optimizer, 0)  # Adam moments exist from here on
        weights, moments = state_bytes(policy, optimizer)
        base_params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
        sizes = {"weights": weights, "moments": moments, "base_params": base_params, "base_bytes": 4 * base_params}
        print(f"trainable weights {weights / 1e6:.1f} MB + Adam moments {moments / 1e6:.1f} MB; "
              f"base {base_params / 1e6:.1f} M parameters", flush=True)
        if weights + moments < 100e6:
            raise SystemExit("the benchmark configuration is below 100 MB of trainable state")
        saves = measure_saves(work, policy, optimizer, parts, args.repeats)
        checkpoint = sorted((work / "sync" / "checkpoints").glob("step_*"))[-1]
        del base, policy, optimizer, parts
        start = measure_start(checkpoint, args.repeats)
        text = report(sizes, saves, start, args.repeats, time.perf_counter() - began, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    if not args.no_write_results:
        write_section(text)
        print(f"wrote the {SECTION!r} section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
