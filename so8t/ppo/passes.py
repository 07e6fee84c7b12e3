"""The no-grad passes over a rollout batch, in row chunks: sampling, frozen prefix, reference.

``hardware.rollout_micro_batch_size`` bounds how many rows one pass holds at a time, so the
KV cache of sampling and the rows x response x vocabulary fp32 logits of the reference pass
never exist for the whole rollout batch at once. Every row is computed independently of the
others (left-padded queries, a per-row attention mask), so chunking changes no result; the
per-row results are concatenated back into one batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from so8t.ppo.rollout import Rollout, response_logits, token_logprobs


def row_chunks(rows: int, size: int | None) -> list[slice]:
    """Consecutive row slices of at most ``size`` rows (None: one slice of all rows)."""
    size = rows if not size else int(size)
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _pad_right(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    fill = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, fill], dim=1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from row chunks; shorter responses are padded like finished rows (pad token,
    mask 0, log-prob and value 0), as one whole-batch pass would have left them."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.response_ids.shape[1] for p in parts)

    def cat(name: str, value) -> torch.Tensor:
        return torch.cat([_pad_right(getattr(p, name), length, value) for p in parts], dim=0)

    return Rollout(
        query_ids=torch.cat([p.query_ids for p in parts]),
        query_mask=torch.cat([p.query_mask for p in parts]),
        response_ids=cat("response_ids", pad_id),
        response_mask=cat("response_mask", 0),
        logprobs=cat("logprobs", 0.0),
        values=cat("values", 0.0),
        ended_with_stop=torch.cat([p.ended_with_stop for p in parts]),
    )


def sample_in_chunks(sample: Callable[[torch.Tensor, torch.Tensor, slice], Rollout], query_ids: torch.Tensor,
                     query_mask: torch.Tensor, chunk: int | None, pad_id: int) -> Rollout:
    """``sample(query_ids, query_mask, rows)`` (a ``sample_responses`` call on those rows) chunk
    by chunk; ``rows`` is the chunk's slice of the batch, e.g. to pick its random numbers."""
    parts = [sample(query_ids[rows], query_mask[rows], rows) for rows in row_chunks(query_ids.shape[0], chunk)]
    return concat_rollouts(parts, pad_id)


@torch.no_grad()
def rollout_prefix(policy, rollout: Rollout, chunk: int | None) -> torch.Tensor | None:
    """The frozen prefix (hidden states entering the first adapted layer) of every row of the
    rollout's query + response; None when the adapters start at layer 0."""
    if policy.first_adapted_layer < 1:
        return None
    ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
    parts = [policy.frozen_prefix(ids[rows], mask[rows]) for rows in row_chunks(ids.shape[0], chunk)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.no_grad()
def response_logprobs(policy, rollout: Rollout, temperature: float, pad_id: int, chunk: int | None,
                      prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens (0 where masked) and values, chunk by chunk.

    Used for the reference pass (inside ``policy.reference()``) and for recomputing old
    log-probs with the training forward."""
    logprobs, values = [], []
    for rows in row_chunks(rollout.response_ids.shape[0], chunk):
        logits, chunk_values, tokens = response_logits(policy, rollout, rows, prefix)
        logprobs.append(token_logprobs(logits, tokens, temperature, pad_id)[0])
        values.append(chunk_values)
        del logits  # the chunk's rows x response x vocabulary logits go before the next chunk
    mask = rollout.response_mask
    return torch.cat(logprobs) * mask, torch.cat(values) * mask


@torch.no_grad()
def reference_logprobs(policy, rollout: Rollout, temperature: float, pad_id: int, chunk: int | None,
                       keep_prefix: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference policy's log-probs of the responses (adapters off), chunk by chunk, and,
    with ``keep_prefix``, the frozen prefix recorded on the way (None when there is none).

    The layers below the first adapter are the same with the adapters off, so the full
    reference pass yields the prefix that the PPO epochs (and a recompute) then start from."""
    with policy.reference():
        if not keep_prefix:
            return response_logprobs(policy, rollout, temperature, pad_id, chunk)[0], None
        with policy.recording_prefix() as recorded:
            logprobs = response_logprobs(policy, rollout, temperature, pad_id, chunk)[0]
    if not recorded:
        return logprobs, None
    return logprobs, torch.cat(recorded) if len(recorded) > 1 else recorded[0]
