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
    import so8t.ppo.schedules  # noqa: F401
    import so8t.ppo.trainer  # noqa: F401
    from so8t.build import build_components
    from so8t.config import CONF_DIR, register
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
        f"ppo.optimizer.learning_rate={common.LEARNING_RATE}",
    ]
    if args.adapter == "lora":
        overrides += [
            f"adapter.r={common.LORA_R}",
            f"adapter.alpha={common.LORA_ALPHA}",
            "adapter.target_modules=[" + ",".join(common.LORA_TARGETS) + "]",
        ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose("train", overrides=overrides)
    components = build_components(hydra_cfg)
    trainer = components.trainer
    trainer.reward_fn = RewardFunction([RewardTerm("reward_token", fraction_of_reward_token, 1.0)])

    steps = [0]
    trainer.optimizer.register_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
    trainable = sum(p.numel() for p in trainer.policy.trainable_parameters())

    times, cpu_times, episodes, tokens = [], [], [], []
    for _ in range(args.warmup + args.updates):
        tokens_before, episodes_before = trainer.counters.tokens, trainer.counters.episodes
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train_step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        episodes.append(trainer.counters.episodes - episodes_before)
        tokens.append(trainer.counters.tokens - tokens_before)
    peak_mb = common.rss_peak_mb()

    result = common.summarise(times, cpu_times, episodes, tokens, args.warmup)
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
