"""PPO throughput and memory: SO8T against TRL 0.29.1's PPOTrainer, side by side (issue 6).

    python benchmarks/ppo_throughput.py                    # both configurations, 3 rounds
    python benchmarks/ppo_throughput.py --configs small --rounds 5 --updates 30
    python benchmarks/ppo_throughput.py --configs phi3 --rounds 3 --updates 3 --warmup 1

The ``phi3`` configuration (Phi-3.5 vocabulary and tokenizer, adapters on the last quarter of the
layers) compares SO8T with itself instead of TRL: frozen-prefix reuse and chunked passes
(``hardware.frozen_prefix_reuse``, ``hardware.rollout_micro_batch_size``) on and off, side by
side in one run, with per-phase wall and CPU times and the largest log-prob difference between
the prefix-reuse pass and the full pass; it writes the section "## Frozen-prefix reuse and
chunked passes" of ``benchmarks/RESULTS.md``. Everything below is about the TRL comparison.

What it does:

* Creates once, outside the repository, a virtual environment for the peer
  (``~/.cache/so8t-bench/trl-0.29.1``, or ``--peer-venv``) with the torch, transformers and
  peft versions of this environment plus ``trl==0.29.1``, and runs TRL there
  (``benchmarks/_trl_peer.py``); SO8T runs in this environment (``benchmarks/_so8t_side.py``).
* Builds, per configuration, one Phi-3-architecture model from a config (random weights,
  no download) and the tiny SO8T tokenizer into a temporary folder that both sides load,
  and one prompt file: 256 prompts ``ab+cd=`` with two-digit operands, all 6 tokens long,
  so no side pads its queries.
* Identical work: same model, tokenizer, prompts, rollout batch, response length, 4 PPO
  epochs over ONE mini-batch (TRL 0.29 takes fewer optimizer steps than asked when
  ``num_mini_batches > 1``; both sides' optimizer steps are counted with a step hook and
  printed), fp32 on CPU, the same thread count, the same cheap function reward, EOS
  stopping on both sides. The model is built so that it never samples ``<eos>`` or
  ``<pad>`` (see ``build_model_dir``): every response is exactly ``response`` tokens on
  both sides, which the table shows as the measured mean response length.
* Sides: ``so8t-so8`` (SO8T's default SO(8) adapters), ``so8t-lora`` (SO8T with LoRA of
  TRL's rank and targets), ``trl`` (TRL as shipped: LoRA via ``peft_config``, its separate
  value model) and ``trl-nogc`` (the same with its two per-update ``gc.collect()`` calls
  made no-ops). Each round runs every side once, in alternating order, each in a fresh
  process: ``--warmup`` untimed updates, then ``--updates`` timed updates.
* Prints and writes to ``benchmarks/RESULTS.md`` (section "## PPO throughput") the median
  over rounds of episodes/s and response tokens/s per side, SO8T / TRL ratios, and each
  side's peak RSS minus its RSS after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _bench_common as common  # noqa: E402

TRL_VERSION = "0.29.1"
DEFAULT_PEER_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "so8t-bench" / f"trl-{TRL_VERSION}"
SIDES = ("so8t-so8", "so8t-lora", "trl", "trl-nogc")
# The Phi-3-shaped configuration compares SO8T with itself: (frozen-prefix reuse, chunked passes).
PASS_SIDES = {"so8t-full": ("off", False), "so8t-reuse": ("on", False), "so8t-chunked": ("off", True),
              "so8t-reuse-chunked": ("on", True)}
SECTION = "## PPO throughput"
NUM_PROMPTS = 256

# Where the time goes: measured by per-phase CPU timing and torch.profiler on this machine
# (2 cores, 1 thread, 2026-11-28); rerun them if the code changes much.
NOTES = [
    "Where the time goes (per-phase CPU timing and torch.profiler, 1 thread, 2026-11-28):",
    "",
    "* SO8T per update: small so8 31 ms = sampling 12 ms (16 KV-cached trunk calls, mostly transformers' per-call "
    "Python overhead at this size), reference pass 2 ms, 4 PPO forwards 7 ms, 4 backwards 5 ms, losses/stats 3 ms, "
    "optimizer 1 ms; small lora 39 ms (PEFT's per-module overhead in every call, backward 8 ms, AdamW over 34 "
    "tensors 2 ms). Medium so8 0.97 s = sampling 0.24 s (64 calls), reference + 4 PPO forwards 0.42 s, "
    "4 backwards 0.29 s: matmul-bound. Medium lora 1.25 s: backward 0.51 s, most of the extra over so8 being "
    "LoRA's rank-8 weight-gradient GEMMs (a transposed skinny operand that MKL runs at a few GFLOP/s).",
    "* TRL's policy is the same PEFT LoRA model doing the same sampling, reference, forward and backward work; "
    "on top it runs a separate value model (a second trunk: a forward in the rollout and a forward and backward "
    "with full weight gradients in every PPO epoch) and, as shipped, two `gc.collect()` per update (88 % of its "
    "time on small, 17 % on medium). SO8T's shared trunk removes the value model; against TRL without "
    "`gc.collect()` that is worth about 1.5x (small) to 1.8x (medium) for LoRA, because the LoRA policy work is "
    "the same library code on both sides. The SO(8) adapters also avoid PEFT's per-module overhead, which "
    "brings that ratio to about 2x.",
    "* SO8T changes that these figures include: the sampling pass computes each SO(8) rotation once per rollout "
    "instead of once per trunk call (bit-identical), `lm_head` and the value head run only at the positions PPO "
    "uses, the entropy (logged only, `ent_coef=0`) stays out of the autograd graph, and the trainer reads its "
    "PPO settings from a plain dataclass rather than an OmegaConf node: small so8 217 -> 271 episodes/CPU-s, "
    "medium so8 15.1 -> 16.5; LoRA unchanged within noise.",
    "",
]


# --------------------------------------------------------------------------- environments

def _versions_here() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
            "peft": peft.__version__}


def ensure_peer_venv(venv: Path, torch_index_url: str | None = None) -> Path:
    """Create the peer venv once (torch first, so pip never pulls another torch build).

    ``torch_index_url`` (e.g. https://download.pytorch.org/whl/cpu) picks where that torch
    comes from; by default pip's configured index."""
    python = venv / "bin" / "python"
    marker = venv / ".so8t-bench-ready"
    versions = _versions_here()
    wanted = json.dumps({**versions, "trl": TRL_VERSION}, sort_keys=True)
    if marker.is_file() and marker.read_text() == wanted and python.is_file():
        return python
    print(f"creating the peer environment in {venv} (once) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    index = ["--index-url", torch_index_url] if torch_index_url else []
    subprocess.run(pip + [f"torch=={versions['torch']}", *index], check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}", f"transformers=={versions['transformers']}",
                          f"peft=={versions['peft']}", f"torch=={versions['torch']}"], check=True)
    marker.write_text(wanted)
    return python


# --------------------------------------------------------------------------------- inputs

def build_model_dir(name: str, folder: Path, seed: int = 0) -> None:
    spec = common.CONFIGS[name]
    if "vocab" in spec:  # the Phi-3.5 vocabulary and tokenizer, same never-stop construction
        import _phi35

        _phi35.build_model_dir(folder, seed=seed, hidden_size=spec["hidden_size"],
                               num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                               intermediate_size=spec["intermediate_size"], vocab_size=spec["vocab"])
        return
    _build_tiny_vocab_model_dir(name, folder, seed)


def _build_tiny_vocab_model_dir(name: str, folder: Path, seed: int = 0) -> None:
    """A random Phi-3 of the configuration's size + the tiny tokenizer, saved for both sides.

    With random weights every token, ``<eos>`` and ``<pad>`` included, has a few percent
    chance per step, so response lengths (and the work) would differ at random between
    the sides. Two weight edits make both unreachable while keeping every shape and FLOP:
    channel 0 of every token embedding is a constant 1, which the residual stream carries
    to the final norm as a large positive channel; the ``lm_head`` rows of ``<eos>`` and
    ``<pad>`` get -5 in that channel, which puts their logits tens of nats below the rest.
    """
    import torch
    from transformers import Phi3ForCausalLM

    from so8t.model.tiny import build_tiny_config, build_tiny_tokenizer

    spec = common.CONFIGS[name]
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(
        hidden_size=spec["hidden_size"], num_layers=spec["num_layers"], num_heads=spec["num_heads"],
        intermediate_size=spec["intermediate_size"], max_position_embeddings=128, tokenizer=tokenizer,
    )
    tokenizer.model_max_length = 128
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        for token_id in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            model.lm_head.weight[token_id, 0] = -5.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_prompts(path: Path, seed: int = 1234) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(NUM_PROMPTS):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            fh.write(json.dumps({"prompt": f"{a}+{b}="}) + "\n")


# ----------------------------------------------------------------------------------- runs

def run_side(side: str, python: str, model_dir: Path, prompts: Path, config: str, args, workdir: Path,
             extra: list[str] = ()) -> dict:
    common_args = ["--model-dir", str(model_dir), "--prompts", str(prompts), "--config", config,
                   "--warmup", str(args.warmup), "--updates", str(args.updates), "--threads", str(args.threads)]
    if side in PASS_SIDES:
        reuse, chunked = PASS_SIDES[side]
        chunk = common.CONFIGS[config].get("rollout_chunk", 1) if chunked else 0
        cmd = [python, str(HERE / "_so8t_side.py"), *common_args, "--adapter", "so8", "--prefix-reuse", reuse,
               "--rollout-chunk", str(chunk)]
    elif side.startswith("so8t"):
        cmd = [python, str(HERE / "_so8t_side.py"), *common_args, "--adapter", side.split("-")[1], *extra]
    else:
        cmd = [python, str(HERE / "_trl_peer.py"), *common_args, "--output-dir", str(workdir / "trl-out")]
        if side == "trl-nogc":
            cmd.append("--no-gc")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONHASHSEED="0", TRL_EXPERIMENTAL_SILENCE="1")
    if not side.startswith("so8t"):
        env.pop("PYTHONPATH", None)  # nothing of this environment may leak into the peer's
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(workdir))
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"{side} ({config}) failed with exit code {proc.returncode}:\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def median(values):
    return statistics.median(values) if values else float("nan")


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for side, rounds in results.items():
        out[side] = dict(
            episodes_per_s=median([r["episodes_per_s"] for r in rounds]),
            tokens_per_s=median([r["tokens_per_s"] for r in rounds]),
            episodes_per_cpu_s=median([r["episodes_per_cpu_s"] for r in rounds]),
            response_tokens=median([r["mean_response_tokens"] for r in rounds]),
            optimizer_steps_per_update=median([r["optimizer_steps_per_update"] for r in rounds]),
            rss_added_mb=median([r["rss_added_mb"] for r in rounds]),
            rss_import_mb=median([r["rss_import_mb"] for r in rounds]),
            trainable_parameters=rounds[0]["trainable_parameters"],
            per_round_eps=[round(r["episodes_per_s"], 2) for r in rounds],
            phases={k: median([r["phase_seconds"][k] for r in rounds]) for k in rounds[0].get("phase_seconds", {})},
            logprob_diff=max((r.get("logprob_max_abs_diff") or 0.0) for r in rounds),
        )
    return out


def table(config: str, summary: dict[str, dict]) -> list[str]:
    spec = common.CONFIGS[config]
    head = (f"**{config}**: hidden {spec['hidden_size']}, {spec['num_layers']} layers, rollout batch {spec['batch']}, "
            f"response {spec['response']} tokens, {spec['ppo_epochs']} PPO epochs x {spec['mini_batches']} mini-batch")
    lines = [head, "",
             "| side | episodes/s | tokens/s | episodes/CPU-s | response tokens | optimizer steps / update "
             "| trainable params | peak RSS - imports (MiB) | episodes/s per round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for side in SIDES:
        if side not in summary:
            continue
        s = summary[side]
        lines.append(f"| {side} | {s['episodes_per_s']:.2f} | {s['tokens_per_s']:.0f} | "
                     f"{s['episodes_per_cpu_s']:.2f} | "
                     f"{s['response_tokens']:.1f} | "
                     f"{s['optimizer_steps_per_update']:g} | {s['trainable_parameters']:,} | {s['rss_added_mb']:.0f} | "
                     f"{', '.join(str(x) for x in s['per_round_eps'])} |")
    lines.append("")
    ratios = []
    for ours in ("so8t-so8", "so8t-lora"):
        for peer in ("trl", "trl-nogc"):
            if ours in summary and peer in summary:
                e = summary[ours]["episodes_per_s"] / summary[peer]["episodes_per_s"]
                t = summary[ours]["tokens_per_s"] / summary[peer]["tokens_per_s"]
                c = summary[ours]["episodes_per_cpu_s"] / summary[peer]["episodes_per_cpu_s"]
                m = summary[ours]["rss_added_mb"] / summary[peer]["rss_added_mb"]
                met = "yes" if e >= 2.0 and m <= 1.0 else "no"
                ratios.append(f"| {ours} / {peer} | {e:.2f}x | {t:.2f}x | {c:.2f}x | {m:.2f}x | {met} |")
    if ratios:
        lines += ["| ratio | episodes/s | tokens/s | episodes/CPU-s | peak RSS - imports "
                  "| target (>= 2x episodes/s, <= 1x RSS) met |",
                  "|---|---:|---:|---:|---:|---|", *ratios, ""]
    return lines


def pass_table(config: str, summary: dict[str, dict]) -> list[str]:
    """The Phi-3-shaped comparison: phase times and the gain of prefix reuse / chunking."""
    spec = common.CONFIGS[config]
    layers = spec["num_layers"]
    lines = [f"**{config}**: hidden {spec['hidden_size']}, {layers} layers, intermediate {spec['intermediate_size']}, "
             f"vocabulary {spec['vocab']}, SO(8) adapters on layers {spec['adapter_layers']} (the last quarter), "
             f"rollout batch {spec['batch']}, {spec['prompt_tokens']}-token prompts, response {spec['response']} "
             f"tokens, {spec['ppo_epochs']} PPO epochs x {spec['mini_batches']} mini-batch; chunked = "
             f"hardware.rollout_micro_batch_size={spec['rollout_chunk']}", "",
             "| side | prefix reuse | chunked | episodes/s | sampling (s) | reference (s) | PPO epochs (s) "
             "| reference + PPO (s) | reference + PPO vs full | reference + PPO (CPU-s) | same in CPU-s vs full "
             "| sampling (CPU-s) | episodes/s vs full | max abs log-prob diff, reuse vs full |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = summary.get("so8t-full")
    for side, (reuse, chunked) in PASS_SIDES.items():
        if side not in summary:
            continue
        s = summary[side]
        ph = s["phases"]
        work = ph["time/reference"] + ph["time/ppo"]
        cpu_work = ph["cpu/reference"] + ph["cpu/ppo"]
        if full:
            fph = full["phases"]
            speed = f"{(fph['time/reference'] + fph['time/ppo']) / work:.2f}x"
            cpu_speed = f"{(fph['cpu/reference'] + fph['cpu/ppo']) / cpu_work:.2f}x"
            eps = f"{s['episodes_per_s'] / full['episodes_per_s']:.2f}x"
        else:
            speed = cpu_speed = eps = "-"
        diff = f"{s['logprob_diff']:.1e}" if reuse == "on" else "-"
        lines.append(f"| {side} | {reuse} | {'yes' if chunked else 'no'} | {s['episodes_per_s']:.2f} | "
                     f"{ph['time/sampling']:.2f} | {ph['time/reference']:.2f} | {ph['time/ppo']:.2f} | {work:.2f} | "
                     f"{speed} | {cpu_work:.2f} | {cpu_speed} | {ph['cpu/sampling']:.2f} | {eps} | {diff} |")
    lines += ["", "Target: reference + PPO-epoch time >= 1.5x faster with prefix reuse, identical log-probs "
              "(the reference pass records the prefix; its cost is counted there).", "", PASS_NOTE, ""]
    return lines


PASS_CONFIGS = tuple(name for name, spec in common.CONFIGS.items() if "adapter_layers" in spec)
PASS_SECTION = "## Frozen-prefix reuse and chunked passes"
PASS_NOTE = "On a shared machine the wall-clock columns also carry the load of other processes (the load average above); the CPU-s columns count this process's own CPU time in each phase and are the figures to compare. At this width `lm_head` (and the log-softmax over 32064 entries) is about a quarter of a forward's work and prefix reuse does not shorten it; in Phi-3.5-mini it is 2.7 %, so the gain there is larger. Chunking (4 chunks of 2 rows) costs sampling time on CPU, where a decoding step's cost is mostly per call, and changes nothing in the other phases; it exists to bound memory."


def run_pass_config(config: str, args, tmp: Path, loads: list, raw: dict) -> dict:
    """Every side of PASS_SIDES on the config, ``args.rounds`` rounds in alternating order."""
    import _phi35

    spec = common.CONFIGS[config]
    model_dir = tmp / f"model-{config}"
    build_model_dir(config, model_dir)
    prompts = tmp / f"prompts-{config}.jsonl"
    _phi35.write_prompts(prompts, count=NUM_PROMPTS, chars=spec["prompt_tokens"])
    chunk = spec["rollout_chunk"]
    variants = ",".join(f"{side}:{reuse}:{chunk if chunked else 0}" for side, (reuse, chunked) in PASS_SIDES.items())
    raw[config] = {side: [] for side in PASS_SIDES}
    for rnd in range(args.rounds):
        result = run_side("so8t-so8", sys.executable, model_dir, prompts, config, args, tmp,
                          extra=["--pass-variants", variants])
        loads.append(load_average())
        for side, one in result["variants"].items():
            raw[config][side].append(dict(one, logprob_max_abs_diff=result["logprob_max_abs_diff"],
                                          rss_added_mb=result["rss_added_mb"]))
            ph = one["phase_seconds"]
            print(f"[{config} round {rnd + 1}/{args.rounds}] {side:18s} {one['episodes_per_s']:6.2f} episodes/s  "
                  f"sampling {ph['time/sampling']:.2f} s  reference {ph['time/reference']:.2f} s  "
                  f"ppo {ph['time/ppo']:.2f} s  (CPU: reference {ph['cpu/reference']:.2f} s, ppo {ph['cpu/ppo']:.2f} s)",
                  flush=True)
        print(f"[{config} round {rnd + 1}/{args.rounds}] max |log-prob difference| reuse vs full: "
              f"{result['logprob_max_abs_diff']}  (load {loads[-1][0]:.2f})", flush=True)
    return {side: dict(episodes_per_s=median([r["episodes_per_s"] for r in rounds]),
                       phases={k: median([r["phase_seconds"][k] for r in rounds]) for k in rounds[0]["phase_seconds"]},
                       logprob_diff=max(r["logprob_max_abs_diff"] or 0.0 for r in rounds),
                       rss_added_mb=median([r["rss_added_mb"] for r in rounds]))
            for side, rounds in raw[config].items()}


def pass_report(sections, args, started: float, loads: list) -> list[str]:
    versions = _versions_here()
    load_1m = [load[0] for load in loads]
    out = [PASS_SECTION, "",
           f"`python benchmarks/ppo_throughput.py --configs {','.join(c for c, _ in sections)} --rounds {args.rounds} "
           f"--updates {args.updates} --warmup {args.warmup} --threads {args.threads}` "
           f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s).",
           "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
           f"{versions['torch']}, transformers {versions['transformers']}; {args.threads} torch thread(s); fp32 CPU; "
           f"1-minute load average {min(load_1m):.2f}-{max(load_1m):.2f}.",
           "",
           f"Medians over {args.rounds} rounds; each round is a fresh process with one trainer that runs the four "
           f"variants in turn, one update each ({args.warmup} warm-up then {args.updates} timed updates per variant, "
           "the order reversed every update), so a busy machine slows all variants alike on average; phase times are the "
           "per-update means of the "
           "metrics row's `time/sampling`, `time/reference` (the reference pass, which records the frozen prefix) and "
           "`time/ppo` (all PPO "
           "epochs). A random Phi-3.5-shaped model that never samples a stop token, so every side does the same "
           "work; the log-prob column is the largest |difference| between the prefix-reuse pass and the full pass "
           "(policy and reference) on a fresh rollout of the same process.",
           ""]
    for config, summary in sections:
        out += pass_table(config, summary)
    return out


def write_results(path: Path, section: list[str], title: str = SECTION) -> None:
    """Replace (or append) the section headed ``title``, keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        new = lines + ([""] if lines and lines[-1].strip() else []) + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = lines[:start] + section + ([""] + lines[end:] if end < len(lines) else [])
    path.write_text("\n".join(new).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="small,medium", help="comma-separated: " + ",".join(common.CONFIGS))
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of A/B (every side once per round)")
    parser.add_argument("--updates", type=int, default=20, help="timed PPO updates per side per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed PPO updates before timing (start-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (default 1: on a small shared machine, more "
                             "threads than free cores make both sides many times slower)")
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                        help="the peer's virtual environment (created on first use)")
    parser.add_argument("--torch-index-url", default=None,
                        help="pip index for the peer's torch when creating its environment "
                             "(e.g. https://download.pytorch.org/whl/cpu for a CPU-only build)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"),
                        help="markdown file whose '## PPO throughput' section is replaced ('' to skip)")
    parser.add_argument("--json", type=Path, default=None, help="also dump every round's raw result here")
    args = parser.parse_args()

    configs = [c for c in args.configs.split(",") if c]
    sides = [s for s in args.sides.split(",") if s]
    unknown = [c for c in configs if c not in common.CONFIGS] + [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown configuration or side: {unknown}")
    pass_configs = [c for c in configs if c in PASS_CONFIGS]
    configs = [c for c in configs if c not in PASS_CONFIGS]
    needs_peer = bool(configs) and any(s.startswith("trl") for s in sides)
    peer_python = str(ensure_peer_venv(args.peer_venv, args.torch_index_url)) if needs_peer else None

    started = time.time()
    loads = [load_average()]
    raw: dict[str, dict[str, list[dict]]] = {}
    sections = []
    with tempfile.TemporaryDirectory(prefix="so8t-ppo-bench-") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        write_prompts(prompts)
        for config in configs:
            model_dir = tmp / f"model-{config}"
            build_model_dir(config, model_dir)
            raw[config] = {side: [] for side in sides}
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else list(reversed(sides))
                for side in order:
                    python = sys.executable if side.startswith("so8t") else peer_python
                    result = run_side(side, python, model_dir, prompts, config, args, tmp)
                    raw[config][side].append(result)
                    loads.append(load_average())
                    print(f"[{config} round {rnd + 1}/{args.rounds}] {side:10s} "
                          f"{result['episodes_per_s']:7.2f} episodes/s  {result['tokens_per_s']:8.0f} tokens/s  "
                          f"{result['episodes_per_cpu_s']:7.2f} episodes/CPU-s  "
                          f"response {result['mean_response_tokens']:.1f}  "
                          f"steps/update {result['optimizer_steps_per_update']:g}  "
                          f"+RSS {result['rss_added_mb']:.0f} MiB  (load {loads[-1][0]:.2f})", flush=True)
            sections.append((config, summarise(raw[config])))
        pass_sections = []
        for config in pass_configs:
            pass_sections.append((config, run_pass_config(config, args, tmp, loads, raw)))

    if pass_sections:
        out = pass_report(pass_sections, args, started, loads)
        print("\n".join(out))
        if args.results:
            write_results(Path(args.results), out, PASS_SECTION)
            print(f"\nwrote the '{PASS_SECTION}' section of {args.results}")
    if not configs:
        if args.json:
            args.json.write_text(json.dumps(raw, indent=1))
        return
    versions = _versions_here()
    peer_versions = next((r["versions"] for c in raw.values() for s, rs in c.items() if s.startswith("trl")
                          for r in rs), None)
    load_1m = [load[0] for load in loads]
    out = [SECTION, "",
           f"`python benchmarks/ppo_throughput.py --configs {','.join(configs)} --rounds {args.rounds} "
           f"--updates {args.updates} --warmup {args.warmup} --threads {args.threads}` "
           f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s).",
           "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
           f"Python {platform.python_version()}; {args.threads} torch thread{'s' if args.threads != 1 else ''} "
           f"on both sides; fp32 CPU; "
           f"1-minute load average during the run {min(load_1m):.2f}-{max(load_1m):.2f} "
           f"(median {median(load_1m):.2f}).",
           f"SO8T side: torch {versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}."
           + (f" Peer: TRL {peer_versions['trl']} (`trl.experimental.ppo.PPOTrainer`), torch {peer_versions['torch']}, "
              f"transformers {peer_versions['transformers']}, peft {peer_versions['peft']}." if peer_versions else ""),
           "",
           f"Medians over {args.rounds} rounds; each round runs every side once (alternating order) in a fresh "
           "process, "
           f"{args.warmup} warm-up updates then {args.updates} timed updates. Identical work: same random Phi-3 model "
           "folder and tokenizer, 6-token prompts, LoRA r=8 (alpha 16, qkv/o/gate_up/down/lm_head) for TRL and "
           "so8t-lora, SO(8) rotations after every layer for so8t-so8, EOS stopping on both sides (the model never "
           "samples EOS or pad, so every response has the full length), one mini-batch per epoch "
           "(optimizer steps / update are counted on both sides), the same function reward. "
           "Peak RSS - imports = ru_maxrss at the end minus VmRSS after the side's imports. "
           "Episodes/CPU-s divides by the process's CPU time instead of wall time (less sensitive to a busy machine). "
           "`trl-nogc` is TRL with its two per-update `gc.collect()` calls made no-ops.",
           ""]
    for config, summary in sections:
        out += table(config, summary)
    out += NOTES
    text = "\n".join(out)
    print()
    print(text)
    if args.results:
        write_results(Path(args.results), out)
        print(f"\nwrote the '{SECTION}' section of {args.results}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
