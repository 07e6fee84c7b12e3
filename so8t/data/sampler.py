"""A resumable sampler of prompt indices.

Each epoch is a permutation of ``range(num_items)`` drawn from its own ``torch.Generator``
seeded with ``seed + epoch``, so the whole future of the sampler is a function of
``(seed, epoch, index)``: those three numbers are its checkpointed state, and restoring
them continues the sequence exactly. No global RNG is touched, so the sampler neither
depends on nor disturbs the other RNGs a checkpoint restores.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class PromptSampler:
    """Endless batches of indices, epoch after epoch, each epoch a fresh seeded permutation.

    A batch may span an epoch boundary (and several epochs when ``batch_size > num_items``),
    so every batch has exactly ``batch_size`` indices.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items < 1:
            raise ValueError(f"PromptSampler needs at least one item, got num_items={num_items}")
        if batch_size < 1:
            raise ValueError(f"PromptSampler needs batch_size >= 1, got {batch_size}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.index = 0  # position inside the current epoch's permutation
        self._order: list[int] | None = None  # cached permutation of ``self.epoch``

    def _permutation(self) -> list[int]:
        if self._order is None:
            # Imported here so that importing so8t.data (e.g. for config checks) stays fast.
            import torch

            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.num_items, generator=generator).tolist()
        return self._order

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._permutation()
            take = min(self.batch_size - len(batch), self.num_items - self.index)
            batch.extend(order[self.index : self.index + take])
            self.index += take
            if self.index == self.num_items:
                self.epoch += 1
                self.index = 0
                self._order = None
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_items"]) != self.num_items:
            raise ValueError(
                f"sampler state is for {state['num_items']} prompts but the data now has "
                f"{self.num_items}; the prompt set changed since the checkpoint was written"
            )
        index, epoch = int(state["index"]), int(state["epoch"])
        if not 0 <= index < self.num_items or epoch < 0:
            raise ValueError(f"sampler state out of range: epoch={epoch}, index={index}")
        if int(state["seed"]) != self.seed:
            # The saved seed wins: it is what makes the resumed sequence the uninterrupted one.
            log.warning("sampler: checkpoint seed %s replaces configured seed %s", state["seed"], self.seed)
        if int(state["batch_size"]) != self.batch_size:
            # Position is still meaningful, only the batch boundaries move; allowed on purpose.
            log.warning(
                "sampler: batch size changed from %s to %s since the checkpoint",
                state["batch_size"], self.batch_size,
            )
        self.seed = int(state["seed"])
        self.epoch = epoch
        self.index = index
        self._order = None
