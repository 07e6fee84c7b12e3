"""The SO8T side of benchmarks/ppo_throughput.py: ``PPOTrainer.train_step()`` in a loop.

Usage (the driver builds the command)::

    python benchmarks/_so8t_side.py --model-dir D --prompts P.jsonl --config small \
        --adapter so8|lora --warmup 2 --updates 20 --threads 2

Components come from the composed Hydra config exactly as ``so8t-train`` builds them
(``model=local``, ``data=jsonl``); the reward is replaced by the benchmark's cheap function
reward (the same function TRL's side computes from token ids). Prints one
``BENCH_RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402


def fraction_of_reward_token(completions, num_tokens, **kwargs):
    """The benchmark reward: the fraction of response tokens that are REWARD_TOKEN."""
    return [c.count(common.REWARD_TOKEN) / max(1, n) for c, n in zip(completions, num_tokens)]


def time_phases_in_cpu_seconds(trainer) -> dict[str, float]:
    """Process CPU seconds of each phase, accumulated into the returned dict (reset by the caller):
    the same phases as the metrics row's wall-clock times, less sensitive to a busy machine."""
    import so8t.ppo.trainer as trainer_module

    totals = {"sampling": 0.0, "reference": 0.0, "ppo": 0.0}

    def timed(name, fn):
        def wrapped(*args, **kwargs):
            began = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - began
        return wrapped

    trainer_module.sample_in_chunks = timed("sampling", trainer_module.sample_in_chunks)
    trainer_module.reference_logprobs = timed("reference", trainer_module.reference_logprobs)
    trainer.ppo_epoch = timed("ppo", trainer.ppo_epoch)
    return totals


def run_pass_variants(trainer, args, cpu_phases: dict) -> dict:
    """Variants of the same trainer (frozen-prefix reuse, rollout chunk), one update each in turn,
    the order reversed every round: a busy machine slows them all alike, which separate runs
    minutes apart do not guarantee. Switching them between updates is what a resumed run with
    another hardware profile does; the options change how the numbers are computed, not which."""
    variants = []
    for item in args.pass_variants.split(","):
        name, reuse, chunk = item.split(":")
        variants.append((name, reuse == "on", int(chunk) or None))
    times: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    rss_before = common.rss_now_mb()
    for rnd in range(args.warmup + args.updates):
        order = variants if rnd % 2 == 0 else list(reversed(variants))
        for name, reuse, chunk in order:
            trainer.frozen_prefix_reuse, trainer.rollout_micro_batch_size = reuse, chunk
            cpu_phases.update({k: 0.0 for k in cpu_phases})
            episodes = trainer.counters.episodes
            row = trainer.train_step()
            if rnd >= args.warmup:
                times[name].append({**{k: row[k] for k in ("time/sampling", "time/reference", "time/ppo",
                                                             "time/step")},
                                    **{f"cpu/{k}": v for k, v in cpu_phases.items()},
                                    "episodes": trainer.counters.episodes - episodes})
    result = {}
    for name, rows in times.items():
        seconds = sum(r["time/step"] for r in rows)
        result[name] = dict(
            episodes_per_s=sum(r["episodes"] for r in rows) / seconds,
            phase_seconds={k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "episodes"},
        )
    return dict(variants=result, logprob_max_abs_diff=prefix_check(trainer),
                rss_added_mb=common.rss_peak_mb() - rss_before)


def prefix_check(trainer) -> float | None:
    """Max |log-prob difference| between the frozen-prefix pass and the full pass, policy and
    reference, on a fresh rollout (None when the adapters start at layer 0)."""
    import torch

    from so8t.ppo.passes import response_logprobs, rollout_prefix

    scored = trainer.make_rollout()
    prefix = rollout_prefix(trainer.policy, scored.rollout, None)
    if prefix is None:
        return None
    worst = 0.0
    for reference in (False, True):
        with trainer.policy.reference() if reference else torch.no_grad():
            reused, _ = response_logprobs(trainer.policy, scored.rollout, 1.0, trainer.pad_id, None, prefix)
            full, _ = response_logprobs(trainer.policy, scored.rollout, 1.0, trainer.pad_id, None, None)
        worst = max(worst, float((reused - full).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--config", required=True, choices=sorted(common.CONFIGS))
    parser.add_argument("--adapter", choices=["so8", "lora"], default="so8")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix-reuse", choices=["on", "off"], default="on",
                        help="hardware.frozen_prefix_reuse")
    parser.add_argument("--rollout-chunk", type=int, default=0,
                        help="hardware.rollout_micro_batch_size (0: the whole rollout batch)")
    parser.add_argument("--pass-variants", default="",
                        help="name:reuse(on|off):chunk,... - run these variants of one trainer in turn, one "
                             "update each per round, instead of one configuration")
    args = parser.parse_args()
    cfg = common.CONFIGS[args.config]

    import gc

    import torch
    import transformers
    import transformers.models.phi3.modeling_phi3  # noqa: F401
    from hydra import compose, initialize_config_dir

    # Everything build_components imports lazily belongs to the import baseline, as do the
    # model classes (TRL's side imports the same before its baseline).
    import so8t.data.prompts  # noqa: F401
    import so8t.data.sampler  # noqa: F401
    import so8t.model.loading  # noqa: F401
    import so8t.model.policy  # noqa: F401
    import so8t.ppo.kl  # noqa: F401
    import so8t.ppo.optim  # noqa: F401
    import so8t.ppo.trainer  # noqa: F401
    from so8t.build import build_components
    from so8t.config import CONF_DIR, register
    from so8t.config.validate import validate
    from so8t.rewards import RewardFunction, RewardTerm

    if args.adapter == "lora":
        import peft  # noqa: F401

        import so8t.model.lora  # noqa: F401

    gc.collect()
    baseline_mb = common.rss_now_mb()

    register()
    batch = cfg["batch"]
    overrides = [
        "model=local",
        f"model.path={args.model_dir}",
        "data=jsonl",
        f"data.path={args.prompts}",
        "data.reference_field=null",
        "data.system_field=null",
        f"adapter={args.adapter}",
        f"seed={args.seed}",
        f"max_steps={args.warmup + args.updates}",
        f"hardware.num_threads={args.threads}",
        f"ppo.rollout_batch_size={batch}",
        f"ppo.mini_batch_size={batch // cfg['mini_batches']}",
        f"ppo.ppo_epochs={cfg['ppo_epochs']}",
        f"ppo.max_new_tokens={cfg['response']}",
        f"ppo.temperature={common.TEMPERATURE}",
        f"ppo.missing_eos_penalty={common.MISSING_EOS_PENALTY}",
        f"ppo.kl.init_coef={common.KL_COEF}",
        f"ppo.clip_range={common.CLIP_RANGE}",
        f"ppo.clip_range_value={common.CLIP_RANGE_VALUE}",
        f"ppo.vf_coef={common.VF_COEF}",
        f"ppo.gamma={common.GAMMA}",
        f"ppo.lam={common.LAM}",
        f"ppo.optimizer.lr={common.LEARNING_RATE}",
        f"hardware.frozen_prefix_reuse={args.prefix_reuse == 'on'}",
        f"hardware.rollout_micro_batch_size={args.rollout_chunk or 'null'}",
    ]
    if "adapter_layers" in cfg:
        overrides.append("adapter.layers=[" + ",".join(str(i) for i in cfg["adapter_layers"]) + "]")
    if "prompt_tokens" in cfg:
        overrides += ["data.chat_template=false", f"data.max_prompt_tokens={cfg['prompt_tokens']}"]
    if args.adapter == "lora":
        overrides += [
            f"adapter.r={common.LORA_R}",
            f"adapter.alpha={common.LORA_ALPHA}",
            "adapter.target_modules=[" + ",".join(common.LORA_TARGETS) + "]",
        ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose("train", overrides=overrides)
    components = build_components(validate(hydra_cfg))
    trainer = components.trainer
    trainer.reward_fn = RewardFunction([RewardTerm("reward_token", fraction_of_reward_token, 1.0)])

    cpu_phases = time_phases_in_cpu_seconds(trainer)
    if args.pass_variants:
        common.emit(run_pass_variants(trainer, args, cpu_phases))
        return
    steps = [0]
    trainer.optimizer.register_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
    trainable = sum(p.numel() for p in trainer.policy.trainable_parameters())

    times, cpu_times, episodes, tokens, phases = [], [], [], [], []
    for _ in range(args.warmup + args.updates):
        tokens_before, episodes_before = trainer.counters.tokens, trainer.counters.episodes
        started, cpu_started = time.perf_counter(), time.process_time()
        row = trainer.train_step()
        phases.append({**{k: row[k] for k in ("time/sampling", "time/reference", "time/ppo")},
                       **{f"cpu/{k}": v for k, v in cpu_phases.items()}})
        cpu_phases.update({k: 0.0 for k in cpu_phases})
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        episodes.append(trainer.counters.episodes - episodes_before)
        tokens.append(trainer.counters.tokens - tokens_before)
    peak_mb = common.rss_peak_mb()

    result = common.summarise(times, cpu_times, episodes, tokens, args.warmup)
    timed = phases[args.warmup:]
    result["phase_seconds"] = {k: sum(p[k] for p in timed) / len(timed) for k in timed[0]}
    result["logprob_max_abs_diff"] = prefix_check(trainer)
    total = args.warmup + args.updates
    result.update(
        side=f"so8t-{args.adapter}",
        config=args.config,
        optimizer_steps=steps[0],
        optimizer_steps_per_update=steps[0] / total,
        trainable_parameters=trainable,
        rss_import_mb=baseline_mb,
        rss_peak_mb=peak_mb,
        rss_added_mb=peak_mb - baseline_mb,
        threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )
    common.emit(result)


if __name__ == "__main__":
    main()
