"""Sampling responses with the KV cache, keeping the old log-probs and values of that pass.

Written by hand rather than with ``generate()``: PPO needs, for every sampled token, its
log-probability at the training temperature and the value estimate of the state that
produced it. In fp32 taking both from the sampling pass matches a full recompute to
|ratio - 1| < 5e-6 and saves one forward per update; in bf16 or fp16, KV-cached one-token
decoding and a full forward round differently, so the trainer recomputes them with its
training forward (``ppo.recompute_old_logprobs``).

A response ends at the first of any *stop token* (an instruct model ends its turn with an
end-of-turn token such as Phi-3.5's ``<|end|>``, and its generation config lists several)
or, optionally, once its text contains a *stop string*. The stop token is part of the
response (its mask is 1): the policy chose to stop, and that choice is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from so8t.model.policy import positions_from_mask


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, Lq), left-padded
    query_mask: torch.Tensor  # (B, Lq)
    response_ids: torch.Tensor  # (B, R), pad after the stop
    response_mask: torch.Tensor  # (B, R), 1 for real tokens including the stop token
    logprobs: torch.Tensor  # (B, R), at the sampling temperature
    values: torch.Tensor  # (B, R), value of the state before each token
    ended_with_stop: torch.Tensor  # (B,) bool: a stop token or stop string ended it


class StopStrings:
    """Ends a response once its decoded text contains one of ``strings``.

    Hand-written because ``generate()``'s StopStringCriteria only works inside
    ``generate()``. Only the last few tokens are decoded each step: a stop string of n
    characters lies within the last n tokens that complete it (every token decodes to at
    least one character, except special tokens, which are skipped).
    """

    def __init__(self, tokenizer, strings) -> None:
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.window = max((len(s) for s in self.strings), default=0) + 1

    def hits(self, tokens: list[torch.Tensor], alive: torch.Tensor) -> torch.Tensor:
        found = torch.zeros_like(alive)
        if not self.strings:
            return found
        recent = torch.stack(tokens[-self.window:], dim=1).tolist()
        for row in alive.nonzero().flatten().tolist():
            text = self.tokenizer.decode(recent[row], skip_special_tokens=True)
            found[row] = any(s in text for s in self.strings)
        return found


@torch.no_grad()
def sample_responses(
    policy,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    stop_ids,
    pad_id: int,
    greedy: bool = False,
    stop_strings: StopStrings | None = None,
    uniforms: torch.Tensor | None = None,
) -> Rollout:
    """Sample from the full distribution (top_k=0, top_p=1) at ``temperature``; a response
    ends at any of ``stop_ids`` (or a stop string), else after ``max_new_tokens``.

    ``uniforms`` (rows x max_new_tokens, in [0, 1)) are the random numbers of the draws, one
    per row and step (drawn here when None): row i's step t depends on nothing but its own
    number, so sampling the batch in row chunks gives the same responses as one pass."""
    batch = query_ids.shape[0]
    device = query_ids.device
    if uniforms is None and not greedy:
        uniforms = torch.rand(batch, max_new_tokens, device=device)
    stops = torch.tensor(sorted({int(i) for i in ([stop_ids] if isinstance(stop_ids, int) else stop_ids)}),
                         dtype=torch.long, device=device)
    if pad_id in stops.tolist():
        raise ValueError(f"the pad token (id {pad_id}) cannot also be a stop token")
    positions = positions_from_mask(query_mask)
    # Logits and values only at the last query position: the first response token's.
    out = policy(query_ids, query_mask, position_ids=positions, use_cache=True, output_slice=slice(-1, None))
    mask = query_mask.long()
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, values, real = [], [], [], []
    for t in range(max_new_tokens):
        logp_all = scaled_log_softmax(out.logits[:, -1], temperature, pad_id)
        if greedy:
            token = logp_all.argmax(dim=-1)
        else:
            token = inverse_cdf_sample(logp_all.exp(), uniforms[:, t])
        alive = ~finished
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        # Finished rows get pad (log-prob -inf): store 0 so masked sums stay finite.
        logprobs.append(logp_all.gather(-1, token[:, None]).squeeze(-1).masked_fill(~alive, 0.0))
        values.append(out.values[:, -1].float())
        real.append(alive)
        ends = torch.isin(token, stops) & alive
        if stop_strings is not None:
            ends = ends | stop_strings.hits(tokens, alive)
        finished = finished | ends
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        out = policy(token[:, None], mask, position_ids=next_position, past_key_values=out.past_key_values,
                     use_cache=True)
        next_position = next_position + 1
    response_mask = torch.stack(real, dim=1).long()
    return Rollout(
        query_ids=query_ids,
        query_mask=query_mask.long(),
        response_ids=torch.stack(tokens, dim=1),
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1) * response_mask,
        values=torch.stack(values, dim=1) * response_mask,
        ended_with_stop=finished,
    )


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (rows x vocabulary) from one uniform number per row.

    Exact sampling by the inverse CDF. ``side="right"`` never lands on a token of probability
    0 (its CDF step is empty); the clamp covers a product ``u * total`` rounded up to the total."""
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    positive = probs > 0
    last_positive = probs.shape[-1] - 1 - positive.flip(-1).int().argmax(-1)
    return torch.minimum(token, last_positive)


def response_logits(policy, rollout: Rollout, rows: torch.Tensor | slice = slice(None),
                    prefix: torch.Tensor | None = None):
    """One trunk pass over query + response; logits and values at response positions.

    ``prefix``: the frozen prefix of the whole rollout (``so8t.ppo.passes.rollout_prefix``);
    the pass then starts at the first adapted layer."""
    query_ids, response_ids = rollout.query_ids[rows], rollout.response_ids[rows]
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([rollout.query_mask[rows], rollout.response_mask[rows]], dim=1)
    start = query_ids.shape[1] - 1
    stop = start + response_ids.shape[1]
    # lm_head and the value head only where a response token is predicted.
    out = policy(ids, mask, output_slice=slice(start, stop), prefix=None if prefix is None else prefix[rows])
    return out.logits.float(), out.values.float(), response_ids


def scaled_log_softmax(logits: torch.Tensor, temperature: float, pad_id: int | None) -> torch.Tensor:
    """Log-softmax at ``temperature`` with the pad token excluded.

    Pad only fills positions after the stop; a sampled pad would end a response without a
    stop and blur the response mask, so the policy never samples it. Training log-probs use the same
    masking so that the ratio compares like with like.
    """
    logits = logits.float() / temperature
    if pad_id is not None:
        logits[..., pad_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` at ``temperature`` and the full log-softmax (for entropy).

    Positions after the stop hold the pad token, whose log-prob is -inf; they are zeroed here so
    that masked sums stay finite."""
    logp_all = scaled_log_softmax(logits, temperature, pad_id)
    logprobs = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    if pad_id is not None:
        logprobs = logprobs.masked_fill(tokens == pad_id, 0.0)
    return logprobs, logp_all
