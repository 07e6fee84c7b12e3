"""The PPO update for a causal LM policy with a value head (DESIGN §5).

One update: sample a rollout batch, score it, turn scores and the per-token KL penalty
into advantages with GAE, then run several epochs of clipped PPO over shuffled
mini-batches, one optimizer step per mini-batch (gradients accumulated over micro-batches).

The trainer knows nothing of checkpoints, signals or files: it exposes its stateful parts
and lets the caller act at step boundaries.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from so8t.ppo.advantages import gae, masked_whiten, token_rewards
from so8t.ppo.losses import ppo_losses
from so8t.ppo.passes import reference_logprobs, sample_in_chunks
from so8t.ppo.rollout import Rollout, response_logits, sample_responses, token_logprobs

log = logging.getLogger(__name__)


def _plain(cfg):
    """A structured OmegaConf node as its dataclass: an attribute read on a node costs ~10 µs
    and the loop makes dozens per update. Anything else is used as given."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return cfg
    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_object(cfg)
        if not isinstance(plain, dict):
            return plain
    return cfg


class Counters:
    """Progress counters that are part of the checkpointed state."""

    def __init__(self) -> None:
        self.step = 0
        self.episodes = 0
        self.tokens = 0
        self.training_time = 0.0

    def state_dict(self) -> dict:
        return dict(step=self.step, episodes=self.episodes, tokens=self.tokens, training_time=self.training_time)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.episodes = int(state["episodes"])
        self.tokens = int(state["tokens"])
        self.training_time = float(state["training_time"])


class TrainableWeights:
    """The policy's trainable tensors (adapters + value head) as a stateful part."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def state_dict(self) -> dict:
        return self.policy.trainable_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_trainable_state_dict(state)


@dataclass
class ScoredRollout:
    rollout: Rollout
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    stats: dict
    # Hidden states entering the first adapted layer (None: no reuse), see so8t.model.prefix.
    prefix: torch.Tensor | None = None


class PPOTrainer:
    def __init__(
        self,
        policy,
        tokenizer,
        prompts,
        sampler,
        reward_fn,
        ppo_cfg,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        kl_controller,
        gate_schedule=None,
        micro_batch_size: int | None = None,
        device: torch.device | str = "cpu",
        rollout_micro_batch_size: int | None = None,
        frozen_prefix_reuse: bool = True,
    ) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.sampler = sampler
        self.reward_fn = reward_fn
        self.cfg = _plain(ppo_cfg)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.kl_controller = kl_controller
        self.gate_schedule = gate_schedule
        self.micro_batch_size = micro_batch_size or ppo_cfg.mini_batch_size
        self.device = torch.device(device)
        # Rows per chunk of the no-grad passes (None: the whole rollout batch at once).
        self.rollout_micro_batch_size = rollout_micro_batch_size
        self.frozen_prefix_reuse = frozen_prefix_reuse
        self.counters = Counters()
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.eos_id:
            raise ValueError("the tokenizer needs a pad token distinct from EOS")

    # ----------------------------------------------------------------- state
    def stateful_parts(self) -> dict[str, Any]:
        """Everything that shapes the future of the run, by name (RNGs are the caller's)."""
        parts: dict[str, Any] = {
            "weights": TrainableWeights(self.policy),
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "kl_controller": self.kl_controller,
            "sampler": self.sampler,
            "counters": self.counters,
        }
        if self.gate_schedule is not None:
            parts["gate_schedule"] = self.gate_schedule
        return parts

    def _apply_gate(self) -> float | None:
        if self.gate_schedule is None:
            return None
        gate = self.gate_schedule.value(self.counters.step)
        self.policy.set_gate(gate)
        return gate

    # --------------------------------------------------------------- rollout
    def _encode_queries(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _decode_responses(self, rollout: Rollout) -> list[str]:
        texts = []
        for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m and t not in (self.eos_id, self.pad_id)]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=False))
        return texts

    @torch.no_grad()
    def make_rollout(self) -> ScoredRollout:
        cfg = self.cfg
        self.policy.eval()
        batch = [self.prompts[i] for i in self.sampler.next_batch()]
        query_ids, query_mask = self._encode_queries([p.text for p in batch])
        chunk = self.rollout_micro_batch_size
        began = time.perf_counter()
        # One uniform number per row and step, drawn for the whole batch: chunks sample the same.
        uniforms = torch.rand(query_ids.shape[0], cfg.max_new_tokens, device=self.device)
        with self.policy.frozen_adapters():
            rollout = sample_in_chunks(
                lambda ids, mask, rows: sample_responses(
                    self.policy, ids, mask, cfg.max_new_tokens, cfg.temperature, self.eos_id, self.pad_id,
                    uniforms=uniforms[rows]),
                query_ids, query_mask, chunk, self.pad_id,
            )
        sampled = time.perf_counter()
        # The reference pass also records the frozen prefix the PPO epochs start from.
        ref_logprobs, prefix = reference_logprobs(self.policy, rollout, cfg.temperature, self.pad_id, chunk,
                                                  keep_prefix=self.frozen_prefix_reuse)
        referenced = time.perf_counter()

        completions = self._decode_responses(rollout)
        eos = rollout.ended_with_eos.tolist()
        num_tokens = rollout.response_mask.sum(1).tolist()
        reward = self.reward_fn(
            completions=completions,
            prompts=[p.text for p in batch],
            references=[p.reference for p in batch],
            eos=eos,
            num_tokens=num_tokens,
            max_new_tokens=cfg.max_new_tokens,
        )
        raw = torch.tensor(reward.total, dtype=torch.float32, device=self.device)
        scores = raw - cfg.missing_eos_penalty * (~rollout.ended_with_eos).float()

        mask = rollout.response_mask.float()
        rewards, kl = token_rewards(scores, rollout.logprobs, ref_logprobs, mask, self.kl_controller.value)
        advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        stats = {
            "reward/mean": float(raw.mean()),
            "reward/std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "score/mean": float(scores.mean()),
            "kl/mean": float(kl.sum(1).mean()),
            "kl/coef": float(self.kl_controller.value),
            "response/length": float(mask.sum(1).mean()),
            "response/eos_rate": float(rollout.ended_with_eos.float().mean()),
            "time/sampling": sampled - began,
            # Includes recording the frozen prefix (see so8t.ppo.passes.reference_logprobs).
            "time/reference": referenced - sampled,
        }
        for name, mean in reward.means().items():
            if mean is not None:  # a term that scored nothing (None everywhere) is not logged
                stats[f"reward/{name}"] = mean
        return ScoredRollout(rollout, ref_logprobs, scores, advantages, returns, kl, stats, prefix)

    # ------------------------------------------------------------------ PPO
    def _micro_batch_loss(self, scored: ScoredRollout, rows: torch.Tensor, token_weight: float):
        cfg = self.cfg
        ro = scored.rollout
        logits, values, tokens = response_logits(self.policy, ro, rows, scored.prefix)
        logprobs, logp_all = token_logprobs(logits, tokens, cfg.temperature, self.pad_id)
        mask = ro.response_mask[rows].float()
        parts = ppo_losses(
            logprobs,
            ro.logprobs[rows],
            scored.advantages[rows],
            values,
            ro.values[rows],
            scored.returns[rows],
            mask,
            cfg.clip_range,
            cfg.clip_range_value,
            token_weight,
        )
        # Without an entropy bonus the entropy is only logged: keep it out of the graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.ent_coef != 0):
            probs = logp_all.exp()
            # The masked pad has p = 0 and log p = -inf; 0 * -inf would be NaN.
            entropy_tokens = -(probs * logp_all.masked_fill(probs == 0, 0.0)).sum(-1)
            entropy_sum = (entropy_tokens * mask).sum()
        loss = parts.policy_loss + cfg.vf_coef * parts.value_loss
        if cfg.ent_coef != 0:
            loss = loss - cfg.ent_coef * entropy_sum * token_weight
        return loss, parts, entropy_sum.detach()

    def ppo_epoch(self, scored: ScoredRollout, stats: dict[str, list[float]]) -> None:
        cfg = self.cfg
        n = scored.rollout.response_ids.shape[0]
        order = torch.randperm(n, device=self.device)
        for start in range(0, n, cfg.mini_batch_size):
            mini = order[start : start + cfg.mini_batch_size]
            tokens_in_mini = float(scored.rollout.response_mask[mini].sum().clamp(min=1))
            self.optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0}
            clip, approx_kl = [], []
            for micro_start in range(0, len(mini), self.micro_batch_size):
                rows = mini[micro_start : micro_start + self.micro_batch_size]
                loss, parts, entropy_sum = self._micro_batch_loss(scored, rows, 1.0 / tokens_in_mini)
                loss.backward()
                totals["loss"] += float(loss.detach())
                totals["policy_loss"] += float(parts.policy_loss.detach())
                totals["value_loss"] += float(parts.value_loss.detach())
                totals["entropy"] += float(entropy_sum) / tokens_in_mini
                clip.append(float(parts.clip_fraction))
                approx_kl.append(float(parts.approx_kl))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            for key, value in totals.items():
                stats.setdefault(key, []).append(value)
            stats.setdefault("clip_fraction", []).append(sum(clip) / len(clip))
            stats.setdefault("approx_kl", []).append(sum(approx_kl) / len(approx_kl))
            stats.setdefault("grad_norm", []).append(float(grad_norm))

    def train_step(self, on_epoch: Callable[[int], None] | None = None) -> dict:
        """One PPO update. Returns the metrics row for this step (without wall-clock keys)."""
        started = time.perf_counter()
        gate = self._apply_gate()
        scored = self.make_rollout()
        self.policy.train()
        stats: dict[str, list[float]] = {}
        ppo_began = time.perf_counter()
        for epoch in range(self.cfg.ppo_epochs):
            self.ppo_epoch(scored, stats)
            if on_epoch is not None:
                on_epoch(epoch)
        ppo_seconds = time.perf_counter() - ppo_began
        self.policy.eval()
        lr = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler.step()
        self.kl_controller.update(scored.stats["kl/mean"], scored.rollout.response_ids.shape[0])

        self.counters.step += 1
        self.counters.episodes += scored.rollout.response_ids.shape[0]
        self.counters.tokens += int(scored.rollout.response_mask.sum())
        step_time = time.perf_counter() - started
        self.counters.training_time += step_time

        row = {"step": self.counters.step, **scored.stats}
        row.update({f"loss/{k}" if k in ("policy_loss", "value_loss") else k: sum(v) / len(v) for k, v in stats.items()})
        row["loss/total"] = row.pop("loss")
        row["lr"] = lr
        row["episodes"] = self.counters.episodes
        row["tokens"] = self.counters.tokens
        if gate is not None:
            row["adapter/gate"] = gate
        row["time/ppo"] = ppo_seconds
        row["time/step"] = step_time
        row["time/training"] = self.counters.training_time
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                log.warning("step %d: %s is %s", self.counters.step, key, value)
        return row
