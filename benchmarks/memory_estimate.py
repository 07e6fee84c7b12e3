"""The memory preflight's estimate against measured peaks of tracked allocations, on CPU.

    python benchmarks/memory_estimate.py            # every configuration below (~3 min on 2 cores)
    python benchmarks/memory_estimate.py --only s256-reuse,s512-gc

For each configuration: a random Phi-3-shaped model (full 32064-row vocabulary) saved to a
temporary folder, components built from the composed config exactly as ``so8t-train`` builds
them (``model=local data=jsonl``), one warm-up update (AdamW allocates its moments), then one
update under ``torch.profiler`` with ``profile_memory=True``. The profiler records every
allocation and free of torch's CPU allocator; their running sum over the update, plus the bytes
of every tensor alive when it starts (weights, buffers, trainable state, gradients, AdamW
moments), is the measured peak - allocations, not RSS, so the Python heap and allocator caching
do not blur it. Phase peaks come from the same events inside the sampling, reference (+ frozen
prefix) and PPO-epoch ranges. The estimate is ``so8t.preflight``'s for the same composed config
(``peak_allocated``: on CPU there is no CUDA context).

Prints the table and writes it to ``benchmarks/RESULTS.md`` (section "## Memory estimate").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import _phi35  # noqa: E402

SECTION = "## Memory estimate"
PROMPT_CHARS = 24
RESPONSE = 32

# name: (model sizes, overrides). Adapters on the last quarter of the layers unless said.
CONFIGS = {
    "s256-reuse": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=768), []),
    "s256-all-layers": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=768),
                        ["adapter.layers=null"]),
    "s512-reuse": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536), []),
    "s512-chunk2": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536),
                    ["hardware.rollout_micro_batch_size=2"]),
    "s512-gc": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536),
                ["adapter.layers=null", "hardware.gradient_checkpointing=true"]),
    "s768-reuse": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048), []),
    "s768-lora": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
                  ["adapter=lora", "adapter.target_modules=[qkv_proj,o_proj]"]),
    # Long prompts, every layer adapted, larger micro-batches: the saved activations dominate.
    "s512-long-all": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536),
                      ["adapter.layers=null", "hardware.micro_batch_size=4", "data.max_prompt_tokens=160"]),
    "s512-long-gc": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536),
                     ["adapter.layers=null", "hardware.micro_batch_size=4", "data.max_prompt_tokens=160",
                      "hardware.gradient_checkpointing=true"]),
}


def last_quarter(layers: int) -> str:
    return "adapter.layers=[" + ",".join(str(-i) for i in range(layers // 4, 0, -1)) + "]"


def compose(model_dir: Path, prompts: Path, sizes: dict, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from so8t.config import CONF_DIR, register
    from so8t.config.validate import validate

    register()
    base = ["model=local", f"model.path={model_dir}", "data=jsonl", f"data.path={prompts}",
            "data.reference_field=null", "data.system_field=null", "data.chat_template=false",
            f"data.max_prompt_tokens={PROMPT_CHARS}", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=2", f"ppo.max_new_tokens={RESPONSE}", "hardware.micro_batch_size=2",
            "hardware.num_threads=1", "output.progress_bars=false"]
    if not any(o.startswith("adapter") for o in overrides):
        base.append(last_quarter(sizes["num_hidden_layers"]))
    adapter_overrides = [o for o in overrides if o.startswith("adapter=")]
    rest = [o for o in overrides if not o.startswith("adapter=")]
    given = {o.split("=", 1)[0] for o in rest}
    base = [o for o in base if o.split("=", 1)[0] not in given]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(hydra_compose("train", overrides=[*adapter_overrides, *base, *rest]))


def live_bytes(trainer) -> int:
    """Bytes of every distinct storage reachable from the model, optimizer and gradients."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    policy = trainer.policy
    for t in [*policy.parameters(), *policy.buffers()]:
        add(t)
        add(t.grad)
    for state in trainer.optimizer.state.values():
        for t in state.values():
            add(t)
    return total


def measure(trainer) -> dict:
    """Peak of tracked allocations over one update, overall and per phase (bytes)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import so8t.ppo.trainer as trainer_module

    def ranged(name, fn):
        def wrapped(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapped

    trainer_module.sample_in_chunks = ranged("phase:sampling", trainer_module.sample_in_chunks)
    trainer_module.reference_logprobs = ranged("phase:reference", trainer_module.reference_logprobs)
    trainer.ppo_epoch = ranged("phase:ppo", trainer.ppo_epoch)

    import gc

    gc.collect()
    baseline = live_bytes(trainer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    ranges = [(e.name().split(":", 1)[1], e.start_ns(), e.end_ns()) for e in events
              if e.name().startswith("phase:")]
    peaks = {"sampling": 0, "reference": 0, "ppo": 0}
    current = peak = 0
    for event in memory:
        current += event.nbytes()
        peak = max(peak, current)
        for name, start, end in ranges:
            if start <= event.start_ns() <= end:
                peaks[name] = max(peaks[name], current)
    return dict(baseline=baseline, peak=baseline + peak, **{k: baseline + v for k, v in peaks.items()})


def run_one(name: str, tmp: Path, args) -> dict:
    import torch

    from so8t.build import build_components
    from so8t.model.memory import estimate
    from so8t.preflight import shapes_for

    sizes, overrides = CONFIGS[name]
    model_dir = tmp / f"model-{sizes['hidden_size']}"
    if not model_dir.is_dir():
        _phi35.build_model_dir(model_dir, **sizes)
    chars = next((int(o.split("=")[1]) for o in overrides if o.startswith("data.max_prompt_tokens=")), PROMPT_CHARS)
    prompts = tmp / f"prompts-{chars}.jsonl"
    if not prompts.is_file():
        _phi35.write_prompts(prompts, chars=chars)
    cfg = compose(model_dir, prompts, sizes, overrides)
    model, run = shapes_for(cfg, cuda=False)
    est = estimate(model, run)
    torch.manual_seed(0)
    trainer = build_components(cfg).trainer
    trainer.train_step()  # warm-up: AdamW's moments, lazily allocated buffers
    measured = measure(trainer)
    return dict(name=name, sizes=sizes, overrides=overrides, params=model.params_total, estimate=est,
                measured=measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file ('' to skip)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration: {unknown}")
    import torch

    torch.set_num_threads(1)
    mib = 1024**2
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="so8t-mem-") as tmp:
        for name in names:
            r = run_one(name, Path(tmp), args)
            est, meas = r["estimate"], r["measured"]
            ratio = est.peak_allocated / meas["peak"]
            phase_est = {"sampling": est.phases["sampling"], "reference": est.phases["reference"],
                         "ppo": est.phases["ppo forward + backward"]}
            row = (f"| {name} | {r['params'] / 1e6:.1f} M | {' '.join(r['overrides']) or '-'} | "
                   f"{meas['baseline'] / mib:.0f} | "
                   + " | ".join(f"{(est.resident_total + phase_est[p]) / mib:.0f} / {meas[p] / mib:.0f}"
                                for p in ("sampling", "reference", "ppo"))
                   + f" | {est.peak_allocated / mib:.0f} | {meas['peak'] / mib:.0f} | {100 * (ratio - 1):+.1f} % |")
            rows.append((ratio, row))
            print(row, flush=True)
    worst = max(abs(r - 1) for r, _ in rows)
    out = [SECTION, "",
           f"`python benchmarks/memory_estimate.py` ({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
           f"{time.time() - started:.0f} s). Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
           f"{platform.python_version()}, torch {torch.__version__}; fp32 CPU, 1 thread.",
           "",
           "Random Phi-3-shaped models (vocabulary 32064), rollout batch 8, mini-batch 4, micro-batch 2, 2 PPO "
           f"epochs, {PROMPT_CHARS}-token prompts (unless said), {RESPONSE}-token responses (the model never samples a stop "
           "token), SO(8) adapters on the last quarter of the layers unless the overrides say otherwise. "
           "Measured = bytes alive at the update's start (weights, trainable state, AdamW moments) + the peak "
           "running sum of torch.profiler's allocation events during one update; estimate = the preflight's for the "
           "same composed config. Phase cells: estimate / measured peak in MiB.",
           "",
           "| config | parameters | overrides | alive at start (MiB) | sampling | reference + prefix | PPO epochs "
           "| estimated peak (MiB) | measured peak (MiB) | error |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
           *[row for _, row in rows], "",
           f"Largest error of the peak: {100 * worst:.1f} % (target: within 20 %).", ""]
    print("\n".join(out))
    if args.results:
        from ppo_throughput import write_results

        write_results(Path(args.results), out, SECTION)
        print(f"wrote the '{SECTION}' section of {args.results}")


if __name__ == "__main__":
    main()
