"""Which tokens end a response.

Instruct models end a turn with an end-of-turn token that is not the tokenizer's EOS
(Phi-3.5: ``<|end|>``), and their ``generation_config.json`` lists every id that may end a
generation (Phi-3.5: ``<|end|>``, ``<|assistant|>``, ``<|endoftext|>``). Sampling that
stopped only at the tokenizer's EOS would run every response to the length limit.
"""

from __future__ import annotations

from typing import Any, Iterable


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model: Any, tokenizer: Any, extra: Iterable[int] | None = None) -> list[int]:
    """The generation config's ``eos_token_id`` (an int or a list) ∪ the tokenizer's EOS ∪
    ``extra`` (``ppo.stop_token_ids``), sorted. The pad token is never a stop token."""
    generation_config = getattr(model, "generation_config", None)
    ids = set(_as_ids(getattr(generation_config, "eos_token_id", None)))
    ids |= set(_as_ids(tokenizer.eos_token_id))
    ids |= set(_as_ids(list(extra or [])))
    vocab = len(tokenizer)
    bad = sorted(i for i in ids if not 0 <= i < vocab)
    if bad:
        raise ValueError(f"stop token ids {bad} are outside the tokenizer's vocabulary of {vocab} "
                         "(check ppo.stop_token_ids and the model's generation_config.json)")
    if tokenizer.pad_token_id in ids:
        raise ValueError(f"the pad token (id {tokenizer.pad_token_id}) is listed as a stop token; "
                         "remove it from ppo.stop_token_ids")
    if not ids:
        raise ValueError("no stop token: the tokenizer has no EOS and the generation config lists none; "
                         "set ppo.stop_token_ids")
    return sorted(ids)
