"""The pieces of data parallelism that need no process group: sharding, batch-size checks,
per-rank Hydra overrides, and what a lone process (a group of one) does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from so8t.data.sampler import PromptSampler
from so8t.distributed import Group, GroupStop, RankParts, RankShard, check_batch_sizes, hydra_overrides_for_rank
from so8t.errors import SetupError


def test_ranks_take_disjoint_contiguous_slices_of_one_global_batch():
    shards = [RankShard(PromptSampler(10, 6, seed=3), Group(rank=r, world_size=2)) for r in range(2)]
    reference = PromptSampler(10, 6, seed=3)
    for _ in range(4):  # across epoch boundaries too
        whole = reference.next_batch()
        halves = [shard.next_batch() for shard in shards]
        assert halves[0] + halves[1] == whole
    # The position is the global sampler's, the same on every rank: saved once.
    assert shards[0].state_dict() == shards[1].state_dict() == reference.state_dict()


def test_global_batches_must_split_evenly():
    ppo = SimpleNamespace(rollout_batch_size=9, mini_batch_size=3)
    hw = SimpleNamespace(micro_batch_size=None)
    with pytest.raises(SetupError, match="ppo.rollout_batch_size=9 is the global batch"):
        check_batch_sizes(ppo, hw, Group(rank=0, world_size=2))
    check_batch_sizes(ppo, hw, Group())  # a lone process: anything goes


def test_rank_overrides_only_for_ranks_other_than_0(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert hydra_overrides_for_rank() == []
    monkeypatch.setenv("RANK", "1")
    overrides = hydra_overrides_for_rank()
    assert "hydra.output_subdir=null" in overrides
    assert any(o.endswith("/train.rank1.log") for o in overrides)
    monkeypatch.delenv("RANK")
    assert hydra_overrides_for_rank() == []


def test_a_lone_process_is_a_group_of_one_that_changes_nothing():
    import torch

    group = Group()
    tensor = torch.tensor([1.0, 2.0])
    assert group.sum(tensor) is tensor and group.gather_rows(tensor) is tensor
    assert group.broadcast("x") == "x" and group.max_int(3) == 3 and group.sum_floats([1, 2]) == [1.0, 2.0]
    parts = RankParts()
    assert parts.is_writer and parts.agree_reason("time") == "time"
    state = parts.capture_rng()
    assert "ranks" not in state  # the single-process layout of a checkpoint is unchanged
    with pytest.raises(ValueError, match="RNG states of 2 ranks"):
        parts.restore_rng({"world_size": 2, "ranks": [state, state]})


def test_the_agreed_stop_changes_only_at_agree():
    local = SimpleNamespace(requested=False, signum=None)
    stop = GroupStop(local, Group())
    stop.agree()
    local.requested, local.signum = True, 15  # a signal between two boundaries
    assert not stop.requested
    stop.agree()
    assert (stop.requested, stop.name, stop.exit_code) == (True, "SIGTERM", 143)
