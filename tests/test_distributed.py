"""Data-parallel PPO arithmetic, in process: two spawned processes in a real gloo group.

* One PPO epoch (two mini-batches, so two optimizer steps) on 2 ranks, each holding half of
  one injected rollout, ends with the trainable weights of one process that holds the whole
  rollout and visits the same global mini-batches — within fp32 tolerance, on both ranks.
* Advantage whitening over the group equals whitening of the whole batch.
* The checkpoint hand-over: rank 0 receives both ranks' RNG states, each rank takes its own back.
* The training loop's boundary agreement is one collective that carries the save decision and
  every rank's RNG states: the save that follows runs no collective, and its checkpoint holds
  each rank's states exactly as they were at the boundary.

The launcher, the lifecycle and the checkpoints of real runs are in test_distributed_cli.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from so8t.build import build_components
from so8t.checkpoint import CheckpointService
from so8t.checkpoint.state import capture_rng, unflatten_state
from so8t.checkpoint.store import CheckpointStore
from so8t.config import CONF_DIR, register
from so8t.config.validate import validate
from so8t.distributed import Group, GroupStop, RankParts
from so8t.ppo.advantages import masked_whiten
from so8t.ppo.trainer import ScoredRollout
from so8t.run.signals import StopSignal

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name == "nt", reason="gloo over fork-free spawn on POSIX")]

register()

OVERRIDES = ["hardware.num_threads=1", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1",
             "ppo.optimizer.lr=0.05"]
N, WORLD = 8, 2


def _config():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("train", overrides=[*OVERRIDES, "checkpoint=step", "checkpoint.every_steps=1"]))


def _components(group=None):
    return build_components(_config(), group)


def _count_collectives(counts: list[int]) -> None:
    """Count every collective torch.distributed runs (the object ones are made of these)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in ("all_reduce", "all_gather", "gather", "broadcast", "barrier", "scatter", "reduce"):
        original = getattr(c10d, name)

        def counted(*a, _original=original, **k):
            counts[0] += 1
            return _original(*a, **k)

        setattr(c10d, name, counted)
        setattr(dist, name, counted)


def _boundary_save(rank: int, folder: str, group: Group, trainer) -> dict:
    """The training loop's sequence after an update: agree, then save (a checkpoint is due)."""
    service = CheckpointService(f"{folder}/run", _config().checkpoint, trainer.stateful_parts(), {"test": 1},
                                ranks=RankParts(group))
    service.cadence.mark_saved(0)
    stop = GroupStop(StopSignal(), group)
    torch.rand(3)  # each rank's stream somewhere of its own
    at_boundary = capture_rng()
    counts = [0]
    _count_collectives(counts)
    stop.agree(checkpoints=service, step=1)
    in_agreement = counts[0]
    path = service.maybe_save(1)
    in_save = counts[0] - in_agreement
    service.close()
    return {"at_boundary": at_boundary, "in_agreement": in_agreement, "in_save": in_save, "path": str(path)}


def _rows(scored: ScoredRollout, rows: slice) -> ScoredRollout:
    """The episodes ``rows`` of a scored rollout (what one rank would hold)."""
    ro = scored.rollout
    rollout = type(ro)(**{name: getattr(ro, name)[rows] for name in ro.__dataclass_fields__})
    return ScoredRollout(rollout, scored.ref_logprobs[rows], scored.scores[rows], scored.advantages[rows],
                         scored.returns[rows], scored.kl[rows], dict(scored.stats), scored.first_order[rows],
                         [])


def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        group = Group(rank=rank, world_size=WORLD, backend="gloo")
        trainer = _components(group).trainer
        scored = torch.load(f"{folder}/scored.pt", weights_only=False)
        share = N // WORLD
        mine = _rows(scored, slice(rank * share, (rank + 1) * share))
        raw = torch.load(f"{folder}/raw_advantages.pt")
        mask = scored.rollout.response_mask.float()
        whitened = masked_whiten(raw[rank * share:(rank + 1) * share], mask[rank * share:(rank + 1) * share],
                                 gather=group.gather_rows)
        trainer.policy.train_without_dropout()
        stats: dict = {}
        trainer.ppo_epoch(mine, stats, order=torch.arange(share))
        stats = trainer.global_ppo_stats(stats)
        at_handover = capture_rng()
        handed = RankParts(group).capture_rng()
        if rank == 0:
            torch.save(handed["ranks"], f"{folder}/rng.pt")
        dist.barrier()
        own = torch.get_rng_state()
        torch.rand(5)  # moves this rank's stream; restoring must bring it back
        RankParts(group).restore_rng({"world_size": WORLD, "ranks": torch.load(f"{folder}/rng.pt", weights_only=False)})
        restored_equal = torch.equal(torch.get_rng_state(), own)
        dist.barrier()
        boundary = _boundary_save(rank, folder, group, trainer)
        torch.save({"weights": {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()},
                    "whitened": whitened, "stats": stats, "handed": handed, "at_handover": at_handover,
                    "restored_equal": restored_equal, "boundary": boundary}, f"{folder}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_step_of_one_process_over_both_halves(tmp_path):
    torch.manual_seed(0)
    single = _components().trainer
    scored = single.make_rollout()
    torch.save(scored, tmp_path / "scored.pt")
    raw = torch.randn(scored.advantages.shape) * scored.rollout.response_mask.float()
    torch.save(raw, tmp_path / "raw_advantages.pt")

    # Rank 0's episodes are rows 0-3, rank 1's rows 4-7; each visits its rows in order in local
    # mini-batches of 2, so the global mini-batches are {0,1,4,5} and {2,3,6,7}.
    before = {k: v.clone() for k, v in single.policy.trainable_state_dict().items()}
    single.policy.train_without_dropout()
    single_stats: dict = {}
    single.ppo_epoch(scored, single_stats, order=torch.tensor([0, 1, 4, 5, 2, 3, 6, 7]))
    expected = single.policy.trainable_state_dict()

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    moved = max(float((expected[k] - before[k]).abs().max()) for k in expected)
    assert moved > 1e-3, "the update must move the weights, or equal weights prove nothing"
    for result in results:
        for key, value in expected.items():
            torch.testing.assert_close(result["weights"][key], value, rtol=1e-5, atol=1e-6)
    for key in expected:  # and the ranks hold exactly the same weights
        assert torch.equal(results[0]["weights"][key], results[1]["weights"][key])
    # Logged figures are the global mini-batch's.
    for key in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "clip_fraction",
                "ppo/approx_kl_start", "ppo/ratio_max_dev_start"):
        assert results[0]["stats"][key] == pytest.approx(single_stats[key], rel=1e-4, abs=1e-6), key
        assert results[0]["stats"][key] == results[1]["stats"][key]

    whole = masked_whiten(raw, scored.rollout.response_mask.float())
    together = torch.cat([results[0]["whitened"], results[1]["whitened"]])
    torch.testing.assert_close(together, whole, rtol=1e-5, atol=1e-6)

    handed = results[0]["handed"]
    assert handed["world_size"] == WORLD and len(handed["ranks"]) == WORLD
    assert results[1]["handed"] is None  # only rank 0 holds the gathered states
    assert not torch.equal(handed["ranks"][0]["torch_cpu"], handed["ranks"][1]["torch_cpu"])
    assert results[0]["restored_equal"] and results[1]["restored_equal"]
    # Packed into bytes and back, rank 1's states are exactly what it captured itself.
    _assert_same_rng(handed["ranks"][1], results[1]["at_handover"])

    # The boundary agreement: one collective; the save after it: none.
    for result in results:
        assert result["boundary"]["in_agreement"] == 1 and result["boundary"]["in_save"] == 0, result["boundary"]
    path = results[0]["boundary"]["path"]
    tensors, skeleton, manifest = CheckpointStore(tmp_path / "run" / "checkpoints").load(path)
    saved = unflatten_state(skeleton, tensors)["rng"]
    assert manifest["world_size"] == WORLD and saved["world_size"] == WORLD
    for rank in range(WORLD):
        _assert_same_rng(saved["ranks"][rank], results[rank]["boundary"]["at_boundary"])
    assert not torch.equal(saved["ranks"][0]["torch_cpu"], saved["ranks"][1]["torch_cpu"])


def _assert_same_rng(got: dict, expected: dict) -> None:
    assert tuple(got["python"][:1]) == tuple(expected["python"][:1])
    assert list(got["python"][1]) == list(expected["python"][1]) and got["python"][2] == expected["python"][2]
    assert {k: v for k, v in got["numpy"].items()} == {k: v for k, v in expected["numpy"].items()}
    assert torch.equal(torch.as_tensor(got["torch_cpu"]), expected["torch_cpu"])
