"""Data-parallel PPO on ``torch.distributed``: the process group, and what its ranks agree on.

Launched by ``torchrun`` (or as the tasks of a SLURM job through submitit), every rank holds
the frozen base and the adapters, samples and scores its share of each rollout and runs the
PPO epochs on it; the ranks meet in a few collectives so that they stay one run:

* **Data.** ``ppo.rollout_batch_size`` and ``ppo.mini_batch_size`` are *global*: every rank
  draws the same global batch from one sampler (same seed, same position on every rank) and
  keeps its contiguous slice (:class:`RankShard`). So a checkpoint needs the sampler's position
  once, and a run means the same thing at any world size.
* **Randomness.** Every rank starts from rank 0's trainable weights, then seeds its RNGs with
  ``seed + rank`` (its own sampling stream); a checkpoint holds every rank's RNG states
  (handed to rank 0 at the step boundary) and each rank takes its own back on resume
  (:class:`RankParts`).
* **Statistics.** Reward normalisation, advantage whitening, KL, the KL controller's input and
  every logged figure use global sums and counts (:meth:`Group.sum`, :meth:`Group.gather_rows`;
  the figures logged after a rollout and after the PPO epochs each in one
  :meth:`Group.gather_numbers`).
* **Gradients.** The loss of a mini-batch is weighted by the mini-batch's *global* token count,
  and the trainable parameters' gradients are summed across ranks after the micro-batch
  backward passes and before clipping (:meth:`Group.sum_gradients`), so every rank takes the
  same optimizer step, the one a single process would take on all the ranks' episodes.
  Collectives rather than ``DistributedDataParallel``: the trainable state is a few thousand
  numbers inside a frozen base reached through forward hooks (DDP wants to own a module whose
  parameters it buckets, and would walk the frozen ones), the backward runs once per
  micro-batch with accumulation (DDP would reduce on every one unless each is wrapped in
  ``no_sync``), and one all-reduce of one flat buffer per optimizer step is all it takes.
* **Lifecycle.** Rank 0 holds the run folder's lock and writes session.json, metrics, samples,
  train.log, tqdm and ``final/``; the other ranks log to ``train.rank<N>.log``. The lock outcome
  is broadcast; at each step boundary the stop flags, the deadline's verdict, rank 0's save
  decision and (after an update) every rank's RNG states travel in one collective
  (:meth:`GroupStop.agree`), so a checkpoint that follows costs no collective of its own; it is
  written by rank 0 with every rank's part in hand.

A single process (no launcher) is a group of one: every helper here is then the identity and
no process group is created, so the single-process run is unchanged bit for bit.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal as signal_module
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

from so8t.errors import SetupError
from so8t.exit_codes import signal_exit_code

log = logging.getLogger(__name__)

__all__ = [
    "Group",
    "AgreedDeadline",
    "GroupStop",
    "RankParts",
    "RankShard",
    "NullSession",
    "NullWriter",
    "join_group",
    "rank_from_env",
    "hydra_overrides_for_rank",
    "check_batch_sizes",
    "resume_group",
    "redirect_rank_log",
    "failure_hint",
]


@dataclass
class Group:
    """This process's place in the group; ``Group()`` is a lone process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ collectives
    def sum(self, tensor):
        """The element-wise sum over ranks of ``tensor`` (in place; returned)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, values: list[float]) -> list[float]:
        """The sums over ranks of a few Python numbers (float64, one collective)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch

        return self.sum(torch.tensor(values, dtype=torch.float64, device=self._device())).tolist()

    def max_int(self, value: int) -> int:
        """The largest ``value`` any rank passed."""
        if not self.enabled:
            return int(value)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather_rows(self, tensor):
        """Every rank's ``tensor`` concatenated along dim 0, in rank order (equal shapes)."""
        if not self.enabled:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 0)

    def gather_numbers(self, values):
        """Every rank's 1-D float64 ``values`` as the rows of a (world size, len) tensor, in rank
        order: one collective for figures that are then summed, maxed or concatenated."""
        import torch

        values = torch.as_tensor(values, dtype=torch.float64, device=self._device()).reshape(1, -1)
        return self.gather_rows(values).cpu() if self.enabled else values.cpu()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others' values are ignored)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the others."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_tensors(self, tensors: Iterable) -> None:
        """Rank 0's values of ``tensors`` (parameters) on every rank, in place."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def sum_gradients(self, parameters: Iterable) -> None:
        """Sum the gradients of ``parameters`` over ranks, as one flat buffer (one collective).

        A parameter without a gradient on this rank counts as zeros, so every rank passes the
        same buffer shape whatever its episodes reached."""
        if not self.enabled:
            return
        import torch

        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _device(self):
        import torch

        # NCCL only moves CUDA tensors; gloo only CPU ones.
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


# ---------------------------------------------------------------------- set-up


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 without one)."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.isdigit():
            if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
                continue
            return int(value)
    return 0


def hydra_overrides_for_rank() -> list[str]:
    """Hydra overrides for a rank other than 0 under torchrun: its own log file, and no
    ``.hydra/`` folder (rank 0 writes the run's; every rank writing the same files at once
    would race)."""
    rank = rank_from_env()
    if rank == 0 or "RANK" not in os.environ:
        return []
    return [
        f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/train.rank{rank}.log",
        "hydra.output_subdir=null",
        # Rank 0 tells the story on the console; the others only warn there.
        "++hydra.job_logging.handlers.console.level=WARNING",
    ]


_GROUP: Group | None = None


def join_group(hw_cfg) -> Group:
    """The process group this process belongs to, created on first use from the launcher's
    environment (torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a SLURM job
    with several tasks: derived by submitit's ``TorchDistributedEnvironment``). Without a
    launcher, or with a world of one, it is a lone process and no group is created. Jobs of a
    sweep run one after the other in the same processes and share the group."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        try:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except Exception as exc:  # not a submitit job, or an incomplete SLURM environment
            raise SetupError(f"this SLURM job has {env['SLURM_NTASKS']} tasks but their process group "
                             f"could not be derived from the SLURM environment: {exc}") from exc
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        _GROUP = Group()
        return _GROUP

    import torch
    import torch.distributed as dist

    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    device = str(hw_cfg.device)
    backend = getattr(hw_cfg, "distributed_backend", "auto") or "auto"
    if backend == "auto":
        uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if uses_cuda else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = float(getattr(hw_cfg, "collective_timeout_s", 600) or 600)
    if not dist.is_initialized():
        # The timeout bounds every collective (and the rendezvous): a rank that died inside
        # one makes the others fail with an error after this long instead of hanging.
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
        # Torn down before the interpreter exits (as torchtitan does at the end of training): a
        # group left to C++'s exit-time destructors can abort the process ("terminate called
        # without an active exception", SIGABRT instead of the exit code) when ranks exit at
        # nearly the same moment, e.g. both refusing a run dir in use on a loaded machine.
        atexit.register(_leave_group)
    _GROUP = Group(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)
    log.info("rank %d of %d (local rank %d, backend %s, collective timeout %.0f s)",
             rank, world_size, local_rank, backend, timeout)
    return _GROUP


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - leaving must not turn the exit code into a crash
            log.debug("destroying the process group: %s", exc)


def check_batch_sizes(ppo_cfg, hw_cfg, group: Group) -> None:
    """The global batches must split evenly over the ranks (each rank keeps an equal slice)."""
    if not group.enabled:
        return
    for key in ("rollout_batch_size", "mini_batch_size"):
        value = int(getattr(ppo_cfg, key))
        if value % group.world_size:
            raise SetupError(f"ppo.{key}={value} is the global batch and must be a multiple of the world "
                             f"size {group.world_size} (each rank takes an equal share)")
    micro = hw_cfg.micro_batch_size
    local_mini = int(ppo_cfg.mini_batch_size) // group.world_size
    if micro is not None and int(micro) > local_mini:
        log.warning("hardware.micro_batch_size=%s is per rank; each rank's share of a mini-batch is %d",
                    micro, local_mini)


def redirect_rank_log(run_dir: Path, group: Group) -> None:
    """On a rank other than 0, move file logging from the run's train.log to
    train.rank<N>.log (torchrun ranks are already configured so by
    :func:`hydra_overrides_for_rank`; SLURM tasks started by submitit are not)."""
    if group.is_main:
        return
    target = (Path(run_dir) / f"train.rank{group.rank}.log").resolve()
    main_log = (Path(run_dir) / "train.log").resolve()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve() == main_log:
            replacement = logging.FileHandler(target, encoding=handler.encoding)
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(replacement)


def failure_hint(group: Group) -> str | None:
    """What to tell the user when a rank of a group fails: a collective that failed means
    another rank died, was killed or did not answer within the timeout, and the group as a
    whole has to be started again."""
    if not group.enabled:
        return None
    return (f"rank {group.rank} of {group.world_size} stopped. If the error above is in a collective "
            "(a closed connection, a timeout), another rank of the group failed, was killed or did not answer "
            "within hardware.collective_timeout_s: see train.log (rank 0) and train.rank<N>.log. The group "
            "ends as a whole; re-running the same command resumes every rank from the last committed checkpoint.")


# ---------------------------------------------------------------------- data


class RankShard:
    """This rank's contiguous slice of the global batches of a sampler.

    The wrapped sampler draws the same global batch on every rank (same seed, same position),
    so its state (the checkpointed part) is the group's and is saved once."""

    def __init__(self, sampler, group: Group):
        self.sampler = sampler
        self.group = group

    def next_batch(self) -> list[int]:
        batch = self.sampler.next_batch()
        share = len(batch) // self.group.world_size
        return batch[self.group.rank * share : (self.group.rank + 1) * share]

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state) -> None:
        self.sampler.load_state_dict(state)


# ---------------------------------------------------------------------- checkpoints


class RankParts:
    """What each rank hands over to a checkpoint and takes back on resume (for
    :class:`so8t.checkpoint.CheckpointService`). Weights, optimizer, schedules, counters and the
    sampler are the same on every rank (every rank takes the same steps on global figures), so
    rank 0's are the group's; only the RNG streams differ, and a checkpoint holds them all as
    ``{"world_size": W, "ranks": [rank 0's, rank 1's, …]}``. A lone process keeps the plain
    single-process layout.

    The hand-over happens at the step boundary, before rank 0 writes, so a committed checkpoint
    holds every rank's part (or, if a rank died first, is never written). The training loop's
    boundary agreement (:meth:`GroupStop.agree` with ``checkpoints=``) carries the save decision
    and every rank's RNG states in its one collective; a save at that step then needs no
    collective of its own. Without that agreement, :meth:`agree_reason` does the same in one
    collective, and a save at a step whose states were not handed over gathers them first.
    A synchronous save (signal, deadline, end) also ends with rank 0 telling the others it
    committed (:meth:`report_commit`, a barrier), so no rank exits before the checkpoint it
    stops at exists; a background save does not wait for that, as in a single process."""

    def __init__(self, group: Group | None = None):
        self.group = group or Group()
        self._agreed: tuple[int, str | None] | None = None  # (step, save reason) of the last agreement
        self._handed: tuple[int, list[Any]] | None = None  # (step, every rank's packed RNG states)

    @property
    def is_writer(self) -> bool:
        return self.group.is_main

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def boundary_part(self) -> Any:
        """This rank's RNG states, packed for a boundary agreement (a uint8 tensor)."""
        from so8t.checkpoint.state import capture_rng

        return _pack_rng(capture_rng())

    def accept(self, step: int, reason: str | None, rows: list[Any] | None) -> None:
        """The outcome of a boundary agreement at ``step``: rank 0's save decision, and every
        rank's packed RNG states (the rows of the collective, in rank order)."""
        self._agreed = (step, reason)
        if rows is not None:  # unpacked only if a save uses them; rank 0 alone keeps them
            self._handed = (step, rows if self.group.is_main else [])

    def agree_reason(self, reason: str | None, step: int | None = None) -> str | None:
        """Rank 0's save decision at ``step`` (a time cadence reads each rank's own clock): the
        one the boundary agreement already made, or else agreed now, in one collective that
        also hands over the RNG states."""
        if not self.group.enabled:
            return reason
        if step is not None and self._agreed is not None and self._agreed[0] == step:
            agreed, self._agreed = self._agreed[1], None
            return agreed
        own = self.boundary_part()
        _, _, code, rows = _agree(self.group, 0, 0, _reason_code(reason), own)
        agreed = _reason_of(code)
        if step is not None:
            self.accept(step, agreed, rows)
            self._agreed = None
        return agreed

    def capture_rng(self, step: int | None = None) -> Any:
        """Every rank's RNG states on rank 0, None on the others: the ones handed over at this
        ``step``'s boundary agreement, or else gathered now (a collective: every rank calls it
        at the same save, and all of them know alike whether the states are in hand)."""
        from so8t.checkpoint.state import capture_rng

        own = capture_rng()
        if not self.group.enabled:
            return own
        if step is not None and self._handed is not None and self._handed[0] == step:
            rows = self._handed[1]
        else:
            rows = list(self.group.gather_rows(_pack_rng(own).to(self.group._device())[None]).cpu())
        if not self.group.is_main:
            return None
        # Rank 0's own are taken now, at the snapshot (the same states: nothing drew since).
        return {"world_size": self.group.world_size, "ranks": [own, *[_unpack_rng(r, own) for r in rows[1:]]]}

    def restore_rng(self, saved: Any) -> None:
        from so8t.checkpoint.state import restore_rng

        if isinstance(saved, dict) and "ranks" in saved:
            ranks = saved["ranks"]
            if len(ranks) != self.group.world_size:
                raise ValueError(f"the checkpoint holds RNG states of {len(ranks)} ranks, this group has "
                                 f"{self.group.world_size}")
            restore_rng(ranks[self.group.rank])
        else:
            if self.group.enabled:
                raise ValueError("the checkpoint holds the RNG state of a single process")
            restore_rng(saved)

    def report_commit(self, error: str | None) -> None:
        """After a synchronous save: rank 0 tells the others whether it committed; the others
        wait for that (a barrier) and fail as rank 0 did, so the group ends the same way."""
        from so8t.checkpoint.errors import CheckpointError

        outcome = self.group.broadcast(error)
        if outcome is not None and not self.group.is_main:
            raise CheckpointError(f"rank 0 could not save the checkpoint: {outcome}")


def _reason_code(reason: str | None) -> int:
    from so8t.checkpoint.service import SAVE_REASONS

    return 0 if reason is None else 1 + SAVE_REASONS.index(reason)


def _reason_of(code: int) -> str | None:
    from so8t.checkpoint.service import SAVE_REASONS

    return None if code == 0 else SAVE_REASONS[code - 1]


def _agree(group: Group, signum: int, overrun: int, reason_code: int, packed_rng=None):
    """The one collective of a step boundary: an all-gather of each rank's fixed-size row
    (three numbers, then its packed RNG states if ``packed_rng`` is given: every rank passes
    one or none alike). Returns (the largest stop signal, whether any rank's deadline would
    overrun, rank 0's save reason code, the rows or None). A tensor rather than
    ``all_gather_object``: that pickles and takes two collectives, measured several times
    slower than this one."""
    import torch

    head = torch.tensor([signum, overrun, reason_code], dtype=torch.int64).view(torch.uint8)
    row = head if packed_rng is None else torch.cat([head, packed_rng])
    rows = group.gather_rows(row.to(group._device())[None]).cpu()
    numbers = rows[:, : head.numel()].contiguous().view(torch.int64)
    return (int(numbers[:, 0].max()), int(numbers[:, 1].max()), int(numbers[0, 2]),
            None if packed_rng is None else [r[head.numel():] for r in rows])


# The RNG states as one flat byte row, so they travel in a plain tensor collective. Every
# number of the Python and NumPy Mersenne Twisters fits an int64; the torch states are bytes.
def _pack_rng(state: dict) -> Any:
    import numpy as np
    import torch

    version, words, gauss = state["python"]
    n = state["numpy"]
    numbers = np.array([version, gauss is not None, n["pos"], n["has_gauss"], *words, *n["keys"]], dtype=np.int64)
    floats = np.array([0.0 if gauss is None else gauss, n["cached_gaussian"]], dtype=np.float64)
    parts = [torch.from_numpy(numbers.view(np.uint8)), torch.from_numpy(floats.view(np.uint8)),
             state["torch_cpu"].reshape(-1), *[c.cpu().reshape(-1) for c in state["cuda"]]]
    return torch.cat([t.to(torch.uint8) for t in parts])


def _unpack_rng(row, like: dict) -> dict:
    """The states packed in ``row`` by :func:`_pack_rng`, in the layout of ``like`` (this
    rank's own states: the same generators, so the same sizes), as :func:`capture_rng` gives them."""
    import numpy as np

    data = row.cpu().numpy()
    n_words, n_keys = len(like["python"][1]), len(like["numpy"]["keys"])
    count = 4 + n_words + n_keys
    numbers = data[: 8 * count].view(np.int64).tolist()
    floats = data[8 * count : 8 * count + 16].view(np.float64).tolist()
    at = 8 * count + 16
    tensors = []
    for t in [like["torch_cpu"], *like["cuda"]]:
        tensors.append(row[at : at + t.numel()].clone().reshape(t.shape))
        at += t.numel()
    version, has_gauss, pos, np_has_gauss = numbers[:4]
    return {
        "python": (version, tuple(numbers[4 : 4 + n_words]), floats[0] if has_gauss else None),
        "numpy": {"kind": like["numpy"]["kind"], "keys": numbers[4 + n_words : count], "pos": pos,
                  "has_gauss": np_has_gauss, "cached_gaussian": floats[1]},
        "torch_cpu": tensors[0],
        "cuda": tensors[1:],
    }


def resume_group(checkpoints, mode, identity, group: Group):
    """Every rank resumes from the same checkpoint: rank 0 chooses it (and cleans temporary
    folders), then the others load the very checkpoint it chose. A refusal on rank 0 is a
    refusal on every rank."""
    from so8t.checkpoint.errors import CheckpointError

    if not group.enabled:
        return checkpoints.resume(mode, identity)
    if group.is_main:
        try:
            resumed = checkpoints.resume(mode, identity)
        except CheckpointError as exc:
            group.broadcast(("error", str(exc)))
            raise
        group.broadcast(("path", None if resumed is None else str(resumed.path)))
        return resumed
    kind, value = group.broadcast(None)
    if kind == "error":
        raise CheckpointError(value)
    if value is None:
        checkpoints.cadence.mark_saved(0)
        return None
    return checkpoints.resume_from(value, identity)


# ---------------------------------------------------------------------- lifecycle


def _signal_name(signum: int) -> str:
    try:
        return signal_module.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GroupStop:
    """The stop request as the group agreed on it at the last step boundary.

    A signal reaches every rank under torchrun (it forwards SIGINT/SIGTERM) but not at the
    same instant, and may reach only one (``kill -TERM <pid of rank 1>``): :meth:`agree` takes
    the largest signal number any rank received, so every rank stops after the same update,
    saves the same step and exits with the same 128 + N. Between two agreements the answer
    does not change, so every rank takes the same branches."""

    def __init__(self, local, group: Group):
        self.local = local  # the StopSignal whose handlers this process installed
        self.group = group
        self.signum: int | None = None

    def agree(self, deadline: AgreedDeadline | None = None, checkpoints=None, step: int | None = None) -> None:
        """Agree on the stop request, in one collective with what else this boundary decides:
        ``deadline``, whether the next update would overrun it (read by its
        :meth:`AgreedDeadline.next_step_would_overrun`); ``checkpoints`` (a
        :class:`so8t.checkpoint.CheckpointService`, after the update that made ``step``), rank
        0's save decision and every rank's RNG states, which its ``maybe_save(step)`` or
        ``save_now(step, …)`` then use without a collective of their own."""
        local = (self.local.signum or 0) if self.local.requested else 0
        if not self.group.enabled:
            self.signum = local or None
            return
        overrun = int(deadline.deadline.next_step_would_overrun()) if deadline is not None else 0
        reason = checkpoints.due_reason(step) if checkpoints is not None else None
        packed = checkpoints.ranks.boundary_part() if checkpoints is not None else None
        agreed, overrun, code, rows = _agree(self.group, local, overrun, _reason_code(reason), packed)
        self.signum = agreed or None
        if deadline is not None:
            deadline.agreed = bool(overrun)
        if checkpoints is not None:
            checkpoints.ranks.accept(step, _reason_of(code), rows)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else _signal_name(self.signum)

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else signal_exit_code(self.signum)

    def install(self) -> GroupStop:
        self.local.install()
        return self

    def restore(self) -> None:
        self.local.restore()


class AgreedDeadline:
    """A :class:`so8t.run.clock.Deadline` whose verdict is the group's: any rank whose measured
    step and save would overrun stops them all."""

    def __init__(self, deadline, group: Group):
        self.deadline = deadline
        self.group = group
        # The verdict agreed together with the stop request (GroupStop.agree), for the next call.
        self.agreed: bool | None = None

    def observe_step(self, seconds: float) -> None:
        self.deadline.observe_step(seconds)

    def observe_save(self, seconds: float) -> None:
        self.deadline.observe_save(seconds)

    def next_step_would_overrun(self) -> bool:
        if self.agreed is not None:
            verdict, self.agreed = self.agreed, None
            return verdict
        return bool(self.group.max_int(int(self.deadline.next_step_would_overrun())))


class NullSession:
    """session.json as the ranks other than 0 see it: rank 0 writes the run's."""

    data: dict = {}
    attempt_index = None

    def load(self) -> dict:
        return {}

    def start_attempt(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def end_attempt(self, *args, **kwargs) -> None:
        pass

    def set_checkpoint_stats(self, *args, **kwargs) -> None:
        pass

    def detach(self) -> None:
        pass


class NullWriter:
    """metrics.jsonl / samples.jsonl / the trackers on ranks other than 0."""

    def write(self, row) -> None:
        pass

    def log(self, row) -> None:
        pass

    def close(self, *args) -> None:
        pass
