"""The peer side of benchmarks/ppo_throughput.py: TRL 0.29.1's experimental PPOTrainer.

Runs inside the peer virtual environment (torch + trl==0.29.1 + peft), driven as a library,
never copied. Usage (the driver builds the command)::

    <peer-venv>/bin/python benchmarks/_trl_peer.py --model-dir D --prompts P.jsonl --config small \
        --warmup 2 --updates 20 --threads 2 [--no-gc]

Prints one ``BENCH_RESULT {json}`` line: per-update wall times, episodes, response tokens,
optimizer steps actually taken, peak RSS and the RSS after imports.

TRL as its users run it in low-memory mode: LoRA through ``peft_config`` (the reference is
the adapter-disabled policy, no second copy), a separate value model (a sequence
classification head on its own copy of the base, fully trained, as in TRL's examples), a
reward *model*: here an ``nn.Module`` that scores token ids with the cheap function reward.
``--no-gc`` replaces the two ``gc.collect()`` calls TRL makes per update by no-ops
(they dominate its time on small models; docs/architecture.md, "performance notes").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--config", required=True, choices=sorted(common.CONFIGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gc", action="store_true")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    cfg = common.CONFIGS[args.config]

    import logging
    import types
    import warnings

    import torch
    import transformers
    import transformers.models.phi3.modeling_phi3  # noqa: F401  (the model classes count as imports)
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    import gc

    gc.collect()
    baseline_mb = common.rss_now_mb()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.no_gc:
        # Only TRL's module sees this stand-in; the interpreter's collector keeps running.
        trl_ppo_module.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with open(args.prompts) as fh:
        texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    dataset = Dataset.from_dict({"input_ids": ids})
    reward_token_id = tokenizer.convert_tokens_to_ids(common.REWARD_TOKEN)
    pad_id = tokenizer.pad_token_id

    class _Backbone(nn.Module):
        """Hands the token ids on as the 'hidden state' the reward head reads."""

        def forward(self, input_ids, attention_mask, **kwargs):
            ids = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, pad_id))
            return types.SimpleNamespace(hidden_states=(ids,))

    class FunctionReward(nn.Module):
        """The cheap function reward wrapped as TRL's reward model (``get_reward`` reads
        ``getattr(model, model.base_model_prefix)`` and ``model.score(hidden)``): the score
        at every position is the fraction of response tokens equal to REWARD_TOKEN."""

        base_model_prefix = "backbone"

        def __init__(self, context_length: int) -> None:
            super().__init__()
            self.backbone = _Backbone()
            self.context_length = context_length
            self.response_tokens: list[int] = []

        def score(self, ids):
            response = ids[:, self.context_length:]
            real = response != pad_id
            count = real.sum(1)
            self.response_tokens.append(int(count.sum()))
            frac = ((response == reward_token_id) & real).sum(1).float() / count.clamp(min=1).float()
            return frac[:, None, None].expand(ids.shape[0], ids.shape[1], 1)

    lengths = {len(x) for x in ids}
    if len(lengths) != 1:
        raise SystemExit(f"prompts must all have the same length, got {sorted(lengths)}")
    context_length = lengths.pop()

    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=torch.float32)
    reward_model = FunctionReward(context_length)
    peft_config = LoraConfig(r=common.LORA_R, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0,
                             target_modules=list(common.LORA_TARGETS), bias="none", task_type="CAUSAL_LM")

    total_updates = args.warmup + args.updates
    batch = cfg["batch"]
    ppo_args = PPOConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=cfg["mini_batches"],
        local_rollout_forward_batch_size=batch,
        num_ppo_epochs=cfg["ppo_epochs"],
        total_episodes=batch * total_updates,
        response_length=cfg["response"],
        temperature=common.TEMPERATURE,
        stop_token="eos",
        missing_eos_penalty=common.MISSING_EOS_PENALTY,
        kl_coef=common.KL_COEF,
        cliprange=common.CLIP_RANGE,
        cliprange_value=common.CLIP_RANGE_VALUE,
        vf_coef=common.VF_COEF,
        gamma=common.GAMMA,
        lam=common.LAM,
        learning_rate=common.LEARNING_RATE,
        lr_scheduler_type="constant",
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        dataloader_num_workers=0,
    )

    marks: list[float] = []
    cpu_marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())

        def on_step_end(self, args_, state, control, **kwargs):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())

    trainer = PPOTrainer(
        args=ppo_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    # PrinterCallback would print every update's log dict; the clock is all we need.
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)

    # Count the optimizer steps actually taken (the accelerate wrapper skips some when
    # gradient accumulation and mini-batches disagree; docs/architecture.md, step 5 of an update).
    steps = [0]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    trainer.train()
    peak_mb = common.rss_peak_mb()

    times = [b - a for a, b in zip(marks, marks[1:])]
    tokens = reward_model.response_tokens
    if len(times) != total_updates or len(tokens) != total_updates:
        raise SystemExit(f"expected {total_updates} updates, timed {len(times)}, scored {len(tokens)}")
    cpu_times = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    result = common.summarise(times, cpu_times, [batch] * total_updates, tokens, args.warmup)
    result.update(
        side="trl-nogc" if args.no_gc else "trl",
        config=args.config,
        optimizer_steps=steps[0],
        optimizer_steps_per_update=steps[0] / total_updates,
        trainable_parameters=trainable,
        rss_import_mb=baseline_mb,
        rss_peak_mb=peak_mb,
        rss_added_mb=peak_mb - baseline_mb,
        threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
                      peft=__import__("peft").__version__),
    )
    common.emit(result)


if __name__ == "__main__":
    main()
