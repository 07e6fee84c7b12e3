"""The PPO update for a causal LM policy with a value head.

One update: sample a rollout batch, score it, turn scores and the per-token KL penalty
into advantages with GAE, then run several epochs of clipped PPO over shuffled
mini-batches, one optimizer step per mini-batch (gradients accumulated over micro-batches).

Every forward that produces log-probs runs without dropout (``train_without_dropout``), so
the PPO ratio compares like with like. Where the rollout's compute dtype is not fp32, the
old log-probs and values are recomputed with the training forward itself, grouped exactly
as the first PPO epoch's micro-batches, so the ratio of that first mini-batch is 1 by
construction (KV-cached decoding and a full forward round differently in bf16/fp16); the
reference pass then uses the same grouping, so the KL starts at 0 too.

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
from so8t.ppo.rollout import Rollout, StopStrings, response_logits, sample_responses, token_logprobs

log = logging.getLogger(__name__)

# The PPO epochs' figures (kept under short names while they are summed over mini-batches and
# ranks) and their names in a metrics row.
_EPOCH_METRICS = {
    "loss": "loss/total",
    "policy_loss": "loss/policy",
    "value_loss": "loss/value",
    "entropy": "policy/entropy",
    "clip_fraction": "ppo/clip_fraction",
    "approx_kl": "ppo/approx_kl",
    "grad_norm": "optim/grad_norm",
}


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
    first_order: torch.Tensor  # the first PPO epoch's shuffled row order
    samples: list[dict]
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
        stop_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        reward_normalizer=None,
        grad_scaler=None,
        samples_per_step: int = 4,
        rollout_micro_batch_size: int | None = None,
        frozen_prefix_reuse: bool = True,
        group=None,
    ) -> None:
        from so8t.distributed import Group
        from so8t.model.stops import stop_token_ids

        self.policy = policy
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.sampler = sampler
        self.reward_fn = reward_fn
        self.cfg = ppo_cfg  # a typed PPOConfig (so8t.config.typed): attribute reads in the loop are cheap
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.kl_controller = kl_controller
        self.gate_schedule = gate_schedule
        # Distributed hook (so8t.distributed): the batch sizes are global; this rank holds its
        # share of every rollout and mini-batch, and global figures come from ``self.group``.
        self.group = group or Group()
        self.local_mini_batch_size = ppo_cfg.mini_batch_size // self.group.world_size
        self.micro_batch_size = micro_batch_size or self.local_mini_batch_size
        self.device = torch.device(device)
        # Rows per chunk of the no-grad passes (None: the whole rollout batch at once).
        self.rollout_micro_batch_size = rollout_micro_batch_size
        self.frozen_prefix_reuse = frozen_prefix_reuse
        self.counters = Counters()
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from EOS")
        extra = self.cfg.stop_token_ids
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(policy.base, tokenizer, extra)
        strings = list(self.cfg.stop_strings)
        self.stop_strings = StopStrings(tokenizer, strings) if strings else None
        self.skip_special_tokens = skip_special_tokens
        recompute = self.cfg.recompute_old_logprobs
        if recompute is None:  # only where cached decoding and a full forward round differently
            recompute = next(policy.base.parameters()).dtype != torch.float32
        self.recompute_old_logprobs = bool(recompute)
        self.reward_normalizer = reward_normalizer
        self.grad_scaler = grad_scaler
        self.samples_per_step = samples_per_step
        self.samples: list[dict] = []  # a few episodes of the last update, for the run folder

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
        if self.reward_normalizer is not None:
            parts["reward_normalizer"] = self.reward_normalizer
        if self.grad_scaler is not None:
            parts["grad_scaler"] = self.grad_scaler
        return parts

    def _apply_gate(self) -> float | None:
        if self.gate_schedule is None:
            return None
        gate = self.gate_schedule.value(self.counters.step)
        self.policy.set_gate(gate)
        return gate

    # --------------------------------------------------------------- rollout
    def _encode_queries(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # The prompts were rendered and encoded once (chat template or the tokenizer's own
        # special tokens); here they are only left-padded into a batch.
        enc = self.tokenizer.pad({"input_ids": [list(p.input_ids) for p in batch]}, padding=True,
                                 return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _decode_responses(self, rollout: Rollout) -> tuple[list[str], list[str]]:
        """(completions for the reward terms, raw texts): the reward terms get the text
        without the stop token and, with ``skip_special_tokens``, without special tokens
        (such as a chat template's); the raw text keeps everything the policy wrote."""
        stops = set(self.stop_ids)
        completions, raw = [], []
        for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m]
            raw.append(self.tokenizer.decode(kept, skip_special_tokens=False))
            if self.skip_special_tokens:
                if kept and kept[-1] in stops:
                    kept = kept[:-1]
                completions.append(self.tokenizer.decode(kept, skip_special_tokens=True))
            else:
                completions.append(raw[-1])
        return completions, raw

    def _micro_batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """The first PPO epoch's micro-batches, in order: mini-batches of ``order``, each cut
        into micro-batches (the grouping of :meth:`ppo_epoch`)."""
        groups = []
        for mini in self._mini_batches(order):
            groups += [mini[i : i + self.micro_batch_size] for i in range(0, len(mini), self.micro_batch_size)]
        return groups

    def _logprobs_and_values(self, rollout: Rollout, groups: list[torch.Tensor], prefix: torch.Tensor | None = None):
        """Log-probs and values of the rollout's own tokens under the current policy, one
        forward per group of rows."""
        cfg = self.cfg
        logprobs = torch.zeros_like(rollout.logprobs)
        values = torch.zeros_like(rollout.values)
        for rows in groups:
            logits, vals, tokens = response_logits(self.policy, rollout, rows, prefix)
            logprobs[rows] = token_logprobs(logits, tokens, cfg.temperature, self.pad_id)[0]
            values[rows] = vals
        mask = rollout.response_mask
        return logprobs * mask, values * mask

    def _reference_in_groups(self, rollout: Rollout, groups: list[torch.Tensor]):
        """The reference log-probs, one full forward per group of rows, and (with frozen-prefix
        reuse) the prefix those forwards computed, put back in row order."""
        with self.policy.reference():
            if not self.frozen_prefix_reuse:
                return self._logprobs_and_values(rollout, groups)[0], None
            with self.policy.recording_prefix() as recorded:
                ref_logprobs = self._logprobs_and_values(rollout, groups)[0]
        if not recorded:
            return ref_logprobs, None
        prefix = recorded[0].new_empty((rollout.response_ids.shape[0], *recorded[0].shape[1:]))
        for rows, part in zip(groups, recorded):
            prefix[rows] = part
        return ref_logprobs, prefix

    @torch.no_grad()
    def make_rollout(self) -> ScoredRollout:
        cfg = self.cfg
        times = {}
        began = time.perf_counter()
        self.policy.eval()
        batch = [self.prompts[i] for i in self.sampler.next_batch()]
        query_ids, query_mask = self._encode_queries(batch)
        chunk = self.rollout_micro_batch_size
        # One uniform number per row and step, drawn for the whole batch: chunks sample the same.
        uniforms = torch.rand(query_ids.shape[0], cfg.max_new_tokens, device=self.device)
        with self.policy.frozen_adapters():
            rollout = sample_in_chunks(
                lambda ids, mask, rows: sample_responses(
                    self.policy, ids, mask, cfg.max_new_tokens, cfg.temperature, self.stop_ids, self.pad_id,
                    stop_strings=self.stop_strings, uniforms=uniforms[rows]),
                query_ids, query_mask, chunk, self.pad_id,
            )
        first_order = torch.randperm(rollout.response_ids.shape[0], device=self.device)
        times["time/sampling"] = time.perf_counter() - began

        began = time.perf_counter()
        if self.recompute_old_logprobs:
            # Reference, recompute and the first epoch's first mini-batch all run the same rows
            # together through the same layers, so the first ratio is 1 and the KL 0 exactly.
            groups = self._micro_batches(first_order)
            ref_logprobs, prefix = self._reference_in_groups(rollout, groups)
            times["time/reference"] = time.perf_counter() - began
            began = time.perf_counter()
            self.policy.train_without_dropout()
            rollout.logprobs, rollout.values = self._logprobs_and_values(rollout, groups, prefix)
            self.policy.eval()
            times["time/recompute"] = time.perf_counter() - began
        else:
            # The reference pass also records the frozen prefix the PPO epochs start from.
            ref_logprobs, prefix = reference_logprobs(self.policy, rollout, cfg.temperature, self.pad_id, chunk,
                                                      keep_prefix=self.frozen_prefix_reuse)
            times["time/reference"] = time.perf_counter() - began

        completions, raw_texts = self._decode_responses(rollout)
        ended = rollout.ended_with_stop.tolist()
        num_tokens = rollout.response_mask.sum(1).tolist()
        reward = self.reward_fn(
            completions=completions,
            prompts=[p.text for p in batch],
            references=[p.reference for p in batch],
            eos=ended,
            num_tokens=num_tokens,
            max_new_tokens=cfg.max_new_tokens,
            messages=[p.chat() for p in batch],
        )
        raw = torch.tensor(reward.total, dtype=torch.float32, device=self.device)
        total = raw
        if self.reward_normalizer is not None and not getattr(self.reward_normalizer, "enabled", True):
            total = self.reward_normalizer(raw)  # clipping only: no statistics to share
        elif self.reward_normalizer is not None:
            # Normalised by the statistics of the global batch, the same on every rank.
            everyone = self.reward_normalizer(self.group.gather_rows(raw))
            n = raw.shape[0]
            total = everyone[self.group.rank * n : (self.group.rank + 1) * n]
        scores = total - cfg.missing_eos_penalty * (~rollout.ended_with_stop).float()

        mask = rollout.response_mask.float()
        rewards, kl = token_rewards(scores, rollout.logprobs, ref_logprobs, mask, self.kl_controller.value)
        advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask,
                                       gather=self.group.gather_rows if self.group.enabled else None)

        # The logged figures are the global batch's: per-episode numbers, the explained
        # variance's moments and the reward terms' sums travel in one collective.
        episodes = torch.stack([raw, scores, kl.sum(1), mask.sum(1), rollout.ended_with_stop.float()], 1)
        if self.group.enabled:
            moments, term_sums = _variance_moments(rollout.values, returns, mask), _term_sums(reward)
            sums = torch.tensor(moments + term_sums, dtype=torch.float64, device=self.device)
            rows = self.group.gather_numbers(torch.cat([episodes.reshape(-1).double(), sums]))
            cut = episodes.numel()
            episodes = rows[:, :cut].reshape(-1, episodes.shape[1]).to(episodes.dtype)  # exact: float32 values
            summed = rows[:, cut:].sum(0).tolist()
            explained = _explained_from_moments(summed[: len(moments)])
            term_means = _term_means_from_sums(list(reward.per_term), summed[len(moments):])
        else:
            explained = explained_variance(rollout.values, returns, mask)
            term_means = reward.means()
        raw_all, scores_all, kl_all, length_all, ended_all = episodes.unbind(1)
        stats = {
            "reward/mean": float(raw_all.mean()),
            "reward/std": float(raw_all.std()) if raw_all.numel() > 1 else 0.0,
            "score/mean": float(scores_all.mean()),
            "kl/mean": float(kl_all.mean()),
            "kl/coef": float(self.kl_controller.value),
            "response/length": float(length_all.mean()),
            "response/eos_rate": float(ended_all.mean()),
            "value/explained_variance": explained,
            "episodes/step": int(raw_all.numel()),
            "tokens/step": int(length_all.sum()),
            **times,
        }
        for name, mean in term_means.items():
            if mean is not None:  # a term that scored nothing (None everywhere) is not logged
                stats[f"reward/{name}"] = mean
        samples = [
            {"prompt": p.text, "raw": r, "completion": c, "reward": t, "ended_with_stop": e}
            for p, r, c, t, e in zip(batch, raw_texts, completions, reward.total, ended)
        ][: self.samples_per_step]
        return ScoredRollout(rollout, ref_logprobs, scores, advantages, returns, kl, stats, first_order, samples,
                             prefix)

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
        return loss, parts, entropy_sum.detach(), float(mask.sum())

    def _mini_batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of each global mini-batch of an epoch, in ``order``."""
        step = self.local_mini_batch_size
        return [order[start : start + step] for start in range(0, order.shape[0], step)]

    def _global_token_counts(self, scored: ScoredRollout, epochs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each global mini-batch's token count, for every epoch at once (one collective per
        update): the ranks' losses, weighted by it, add up to the global mini-batch's loss."""
        mask = scored.rollout.response_mask
        flat = self.group.sum(torch.stack([mask[mini].sum() for minis in epochs for mini in minis]))
        return list(flat.split([len(minis) for minis in epochs]))

    def ppo_epoch(self, scored: ScoredRollout, stats: dict[str, list[float]],
                  order: torch.Tensor | None = None, mini_tokens: torch.Tensor | None = None) -> None:
        """One pass over the rollout in ``order`` (a fresh permutation if None); ``mini_tokens``:
        the global mini-batches' token counts if already known (train_step), else counted here."""
        cfg = self.cfg
        n = scored.rollout.response_ids.shape[0]
        order = order if order is not None else torch.randperm(n, device=self.device)
        scaler = self.grad_scaler
        minis = self._mini_batches(order)
        if mini_tokens is None:
            mini_tokens = self._global_token_counts(scored, [minis])[0]
        for mini, tokens_of_mini in zip(minis, mini_tokens):
            tokens_in_mini = float(tokens_of_mini.clamp(min=1))
            self.optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0}
            clip, approx_kl = [], []
            kl_sum, max_dev = 0.0, 0.0
            for micro_start in range(0, len(mini), self.micro_batch_size):
                rows = mini[micro_start : micro_start + self.micro_batch_size]
                loss, parts, entropy_sum, tokens = self._micro_batch_loss(scored, rows, 1.0 / tokens_in_mini)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                totals["loss"] += float(loss.detach())
                totals["policy_loss"] += float(parts.policy_loss.detach())
                totals["value_loss"] += float(parts.value_loss.detach())
                totals["entropy"] += float(entropy_sum) / tokens_in_mini
                clip.append(float(parts.clip_fraction))
                approx_kl.append(float(parts.approx_kl))
                kl_sum += float(parts.approx_kl) * tokens
                max_dev = max(max_dev, float(parts.ratio_max_dev))
            # Distributed hook: every rank steps with the gradient of the global mini-batch
            # (the logged figures are made global once per update, in global_ppo_stats).
            self.group.sum_gradients(self.policy.trainable_parameters())
            if "ppo/ratio_max_dev_start" not in stats:
                # The first mini-batch of the first epoch: before any step, so the ratio is
                # 1 wherever the old log-probs came from the training forward itself.
                stats["ppo/ratio_max_dev_start"] = [max_dev]
                stats["ppo/approx_kl_start"] = [kl_sum / tokens_in_mini]
            if scaler is not None:
                scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
                self.optimizer.step()
            for key, value in totals.items():
                stats.setdefault(key, []).append(value)
            stats.setdefault("clip_fraction", []).append(sum(clip) / len(clip))
            stats.setdefault("approx_kl", []).append(sum(approx_kl) / len(approx_kl))
            stats.setdefault("grad_norm", []).append(float(grad_norm))

    def global_ppo_stats(self, stats: dict[str, list[float]]) -> dict[str, list[float]]:
        """The PPO epochs' logged figures over every rank's share (one collective per update):
        losses, entropy and the start KL add up (each rank's part is weighted by the global
        token count), the per-rank fractions average, the ratio's largest deviation is the
        largest anywhere; the gradient norm is the same on every rank already."""
        if not self.group.enabled:
            return stats
        summed = [k for k in ("loss", "policy_loss", "value_loss", "entropy", "ppo/approx_kl_start") if k in stats]
        averaged = [k for k in ("clip_fraction", "approx_kl") if k in stats]
        keys = summed + averaged
        largest = [k for k in ("ppo/ratio_max_dev_start",) if k in stats]
        # One collective: every rank's figures, summed (in rank order) or maxed here.
        rows = self.group.gather_numbers([v for k in keys + largest for v in stats[k]])
        cut = sum(len(stats[k]) for k in keys)
        flat, peaks = rows[:, :cut].sum(0).tolist(), rows[:, cut:].max(0).values.tolist()
        out, at = dict(stats), 0
        for key in keys:
            n = len(stats[key])
            scale = 1.0 if key in summed else 1.0 / self.group.world_size
            out[key] = [v * scale for v in flat[at : at + n]]
            at += n
        for key, peak in zip(largest, peaks):
            out[key] = [peak]
        return out

    def train_step(self, on_epoch: Callable[[int], None] | None = None) -> dict:
        """One PPO update. Returns the metrics row for this step (phase times included)."""
        started = time.perf_counter()
        gate = self._apply_gate()
        scored = self.make_rollout()
        self.samples = scored.samples
        ppo_began = time.perf_counter()
        self.policy.train_without_dropout()
        stats: dict[str, list[float]] = {}
        # Every epoch's order is drawn up front, so all the mini-batches' token counts travel in
        # one collective. Where nothing in an epoch draws random numbers (dropout is off, see
        # train_without_dropout) these are the orders each epoch would have drawn at its start.
        n = scored.rollout.response_ids.shape[0]
        orders = [scored.first_order] + [torch.randperm(n, device=self.device) for _ in range(self.cfg.ppo_epochs - 1)]
        epochs = [self._mini_batches(order) for order in orders]
        token_counts = self._global_token_counts(scored, epochs)
        for epoch in range(self.cfg.ppo_epochs):
            self.ppo_epoch(scored, stats, orders[epoch], token_counts[epoch])
            if on_epoch is not None:
                on_epoch(epoch)
        self.policy.eval()
        stats = self.global_ppo_stats(stats)
        ppo_time = time.perf_counter() - ppo_began
        lr = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler.step()
        self.kl_controller.update(scored.stats["kl/mean"], scored.stats["episodes/step"])

        self.counters.step += 1
        self.counters.episodes += scored.stats.pop("episodes/step")  # the group's, counted once
        self.counters.tokens += scored.stats.pop("tokens/step")
        step_time = time.perf_counter() - started
        self.counters.training_time += step_time

        # Every name in a namespace (the table in docs/checkpoint-format.md).
        row = {"step": self.counters.step, **scored.stats}
        row.update({_EPOCH_METRICS.get(k, k): sum(v) / len(v) for k, v in stats.items()})
        row["optim/lr"] = lr
        row["count/episodes"] = self.counters.episodes
        row["count/tokens"] = self.counters.tokens
        if gate is not None:
            row["adapter/gate"] = gate
        if self.grad_scaler is not None:
            row["optim/loss_scale"] = float(self.grad_scaler.get_scale())
        row["time/ppo"] = ppo_time
        row["time/step"] = step_time
        row["time/training"] = self.counters.training_time
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                log.warning("step %d: %s is %s", self.counters.step, key, value)
        return row


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group=None) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 when the value head
    predicts the returns, 0 when it predicts no better than their mean, < 0 when worse.
    ``group``: a so8t.distributed.Group whose ranks' tokens all count (from their moments,
    summed in one collective)."""
    from so8t.ppo.advantages import masked_mean

    if group is not None and group.enabled:
        return _explained_from_moments(group.sum_floats(_variance_moments(values, returns, mask)))
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values
    var_error = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    if float(var_returns) == 0.0:
        return 0.0
    return float(1.0 - var_error / var_returns)


def _variance_moments(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """This rank's share of the explained variance: token count, sums and sums of squares of
    the returns and of the value errors (summed over the ranks, then
    :func:`_explained_from_moments`)."""
    error = returns - values
    mask = mask.to(returns.dtype)
    return [float(x) for x in (mask.sum(), (returns * mask).sum(), (returns**2 * mask).sum(),
                               (error * mask).sum(), (error**2 * mask).sum())]


def _explained_from_moments(moments: list[float]) -> float:
    n, r1, r2, e1, e2 = moments
    n = max(n, 1.0)
    var_returns, var_error = r2 / n - (r1 / n) ** 2, e2 / n - (e1 / n) ** 2
    return 0.0 if var_returns <= 0.0 else float(1.0 - var_error / var_returns)


def _term_sums(reward) -> list[float]:
    """Each reward term's sum and count over the episodes it scored on this rank."""
    flat = []
    for name in reward.per_term:
        scored = [s for s in reward.per_term[name] if s is not None]
        flat += [float(sum(scored)), float(len(scored))]
    return flat


def _term_means_from_sums(names: list[str], flat: list[float]) -> dict[str, float | None]:
    """Each reward term's mean over the episodes it scored on every rank (from the summed
    :func:`_term_sums`)."""
    return {n: (flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else None) for i, n in enumerate(names)}

