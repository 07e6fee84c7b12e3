"""The checkpoint service a training loop talks to at step boundaries.

It ties the pieces together — cadence (when), state capture (what), store (how), writer
(in the background), retention (what to keep), identity (may this run resume that) — and
knows nothing about the trainer: it saves and restores *named stateful parts*, anything with
``state_dict()`` / ``load_state_dict()``, plus every RNG and an optional JSON-able
``extra_state()`` (counters, accumulated time) that is handed back on resume.

Typical use::

    service = CheckpointService(run_dir, cfg.checkpoint, parts, identity, extra_state=counters)
    result = service.resume(cfg.resume)          # None: fresh start
    for step in range(start, max_steps):
        train_one_step()
        service.maybe_save(step + 1)
        if stop_requested: service.save_now(step + 1, "signal"); break
    service.save_now(max_steps, "end")
    service.close()
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from so8t.checkpoint.cadence import SaveCadence
from so8t.checkpoint.errors import CheckpointError, CheckpointingStalledError, OwnershipLostError
from so8t.checkpoint.identity import DEFAULT_SHAPE_KEYS, compare_identity, describe_differences
from so8t.checkpoint.retention import Retention
from so8t.checkpoint.state import flatten_state, tensor_bytes, unflatten_state
from so8t.checkpoint.store import (
    LATEST_FILE,
    MANIFEST_FILE,
    CheckpointStore,
    checkpoint_name,
    manifest_sequence,
    parse_step,
)
from so8t.checkpoint.writer import AsyncCheckpointWriter
from so8t.config.identity import upgrade_identity

__all__ = ["CheckpointService", "ResumeResult", "SavedCheckpoint", "SAVE_REASONS", "SPACE_MARGIN"]

logger = logging.getLogger(__name__)

SAVE_REASONS = ("time", "step", "signal", "deadline", "end", "manual")
# Free space wanted before a save, as a multiple of the expected checkpoint size.
SPACE_MARGIN = 1.1
_RESERVED_PARTS = ("rng", "extra")


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path
    reason: str
    size_bytes: int


@dataclass
class ResumeResult:
    step: int
    path: Path
    reason: str | None  # why the checkpoint was saved ("time", "signal", …)
    manifest: dict[str, Any]
    extra_state: Any  # what ``extra_state()`` returned at save time
    changed_keys: list[str] = field(default_factory=list)  # accepted config differences
    rejected: list[tuple[Path, list[str]]] = field(default_factory=list)  # newer, unusable ones


class CheckpointService:
    def __init__(
        self,
        run_dir: str | Path,
        cfg: Any,
        parts: Mapping[str, Any],
        config_identity: Mapping[str, Any],
        extra_state: Callable[[], Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        shape_keys: Iterable[str] = DEFAULT_SHAPE_KEYS,
        world_size: int | None = None,
        fence: Callable[[], None] | None = None,
        ranks: Any = None,
        refuse_identity: Callable[[Mapping[str, Any]], str | None] | None = None,
    ) -> None:
        """
        ``cfg``: a ``CheckpointConfig``-like object (attribute access). ``parts``: name →
        object with ``state_dict()``/``load_state_dict()``. ``config_identity``: flat dict of
        the result-shaping config keys, neutral keys (hardware, logging, checkpoint cadence,
        ``max_steps`` …) already removed by the caller — see :mod:`so8t.checkpoint.identity`.
        ``refuse_identity``: given a checkpoint's saved identity, a reason to refuse resuming
        it (e.g. a config layout this version cannot map), or None.
        """
        for name, part in parts.items():
            if not isinstance(name, str) or not name or name in _RESERVED_PARTS:
                raise ValueError(f"invalid part name {name!r} (reserved: {_RESERVED_PARTS})")
            if not (hasattr(part, "state_dict") and hasattr(part, "load_state_dict")):
                raise TypeError(f"part {name!r} has no state_dict()/load_state_dict()")
        self.config_identity = dict(config_identity)
        json.dumps(self.config_identity)  # fail now, not in the background writer
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.parts = dict(parts)
        self.extra_state = extra_state
        self.shape_keys = tuple(shape_keys)
        self.refuse_identity = refuse_identity
        # Distributed hook: who writes, and how RNG states are handed over (so8t.distributed).
        from so8t.distributed import RankParts

        self.ranks = ranks if ranks is not None else RankParts()
        self.world_size = world_size if world_size is not None else self.ranks.world_size
        self.store = CheckpointStore(self.run_dir / "checkpoints", fence=fence)
        self.cadence = SaveCadence(cfg.cadence, cfg.every_seconds, cfg.every_steps, clock=clock)
        self.retention = Retention(cfg.keep_last, cfg.keep_every_steps)
        self.writer = AsyncCheckpointWriter() if cfg.async_write else None
        self.last_saved: SavedCheckpoint | None = None
        # The checkpoint this service restored or committed: sound by construction, so it is
        # never deleted, whatever LATEST or the folder names say.
        self.newest_verified: SavedCheckpoint | None = None
        # Where this run's history was forked from (resume=<path>); recorded in every manifest.
        self.forked_from: str | None = None
        # Accounting of saves that did not commit, for session.json and the stop rule.
        self.failed_saves = 0
        self.skipped_saves = 0
        self.failures_in_row = 0
        # The two limits after which failing saves stop the run (see _check_protected).
        self.max_failed_saves = int(cfg.max_failed_saves)
        self.max_unprotected = float(cfg.max_unprotected)
        self._clock = clock
        self._protected_step = 0  # step and clock of the last commit (or of the start)
        self._protected_time = clock()
        self._retry_reason: str | None = None  # a failed save's reason: try again next boundary
        self._in_flight: tuple[Any, int, str] | None = None  # (future, step, reason)
        self._last_error: BaseException | None = None  # of the last background write, until a commit
        self._sound: dict[str, bool] = {}  # checkpoint folder name -> verified sound
        self._resumed_size = 0
        self._closed = False
        # The tensors of the previous snapshot, overwritten by the next one (see _snapshot).
        self._snapshot_buffers: dict[str, Any] = {}

    # ------------------------------------------------------------------ saving

    def maybe_save(self, step: int) -> Path | None:
        """Save if the cadence says so, or if the previous save failed. Returns the checkpoint's
        path (for an async write, the path it will have once committed), or ``None`` if nothing
        was saved.

        A full disk or an I/O error is logged as an ERROR and counted, the older checkpoints
        stay intact, training goes on and the save is retried at the next step boundary. When
        saves keep failing (``max_failed_saves`` in a row, or no commit for ``max_unprotected``
        cadence intervals) it raises :class:`CheckpointingStalledError`: training on with
        nothing to resume from would only lose more work.
        """
        # Distributed hook: rank 0 decides (a time cadence reads each rank's own clock); the
        # group's boundary agreement may have done so already (so8t.distributed.GroupStop.agree).
        reason = self.ranks.agree_reason(self.due_reason(step), step)
        path = None
        if reason is not None:
            path = self._save(step, reason, background=self.writer is not None, strict=False)
            if self.writer is None or path is None:
                self._settle(block=False)
        self._check_protected(step)
        return path

    def due_reason(self, step: int) -> str | None:
        """Why a save is due at this step boundary (the cadence, or a retry of a failed save),
        or None; a finished background write is accounted for first."""
        self._settle(block=False)
        return self.cadence.due(step) or self._retry_reason

    def save_now(self, step: int, reason: str) -> Path:
        """Save synchronously (final, signal, deadline saves); raise CheckpointError on failure."""
        if reason not in SAVE_REASONS:
            raise ValueError(f"reason must be one of {SAVE_REASONS}, got {reason!r}")
        path = self._save(step, reason, background=False, strict=True)
        assert path is not None
        return path

    def wait(self) -> BaseException | None:
        """Wait for the background write in flight, if any; return its error."""
        return self._settle(block=True)

    @property
    def stats(self) -> dict[str, Any]:
        """Counts of saves that did not commit, for session.json."""
        return {"failed_saves": self.failed_saves, "skipped_saves": self.skipped_saves,
                "failures_in_row": self.failures_in_row}

    def close(self) -> None:
        """Finish the write in flight; raise CheckpointError if the last write failed."""
        if self._closed or self.writer is None:
            self._closed = True
            return
        self._settle(block=True)
        error = self._last_error
        self._closed = True
        self.writer.close()
        if error is not None:
            raise CheckpointError(
                f"the last background checkpoint write failed ({error!r}); "
                f"the newest usable checkpoint is {self.last_saved.path if self.last_saved else 'an older one'}"
            ) from error

    def _save(self, step: int, reason: str, *, background: bool, strict: bool) -> Path | None:
        # One write in flight: the next save waits here, and the free-space figure below
        # then includes the previous checkpoint.
        self._settle(block=True)
        self.cadence.mark_saved(step)
        if not self.ranks.is_writer:  # distributed hook: hand this rank's part to rank 0, which writes
            self.ranks.capture_rng(step)
            path = self.store.root / checkpoint_name(step)
            if strict:
                self.ranks.report_commit(None)  # waits for rank 0's commit; raises if it failed
                self.last_saved = SavedCheckpoint(step=step, path=path, reason=reason, size_bytes=0)
            return path

        tensors, skeleton = self._snapshot(step)
        needed = int(SPACE_MARGIN * max(self._previous_size(), tensor_bytes(tensors)))
        if not self._ensure_space(step, needed):
            message = (
                f"Low disk space: {_free_bytes(self.store.root) / 1e6:.1f} MB free in {self.store.root}, "
                f"a checkpoint needs about {needed / 1e6:.1f} MB"
            )
            if not strict:
                self.skipped_saves += 1
                self._failed(step, reason, f"{message}; SKIPPING the checkpoint at step {step}")
                return None
            logger.error("%s; trying the %s save at step %d anyway", message, reason, step)

        meta = {
            "reason": reason,
            "covers": [*self.parts, "rng"] + (["extra"] if self.extra_state is not None else []),
            "part_types": {name: type(part).__qualname__ for name, part in self.parts.items()},
            "config_identity": self.config_identity,
            "world_size": self.world_size,
            "forked_from": self.forked_from,
        }
        if background:
            assert self.writer is not None
            future = self.writer.submit(self._write, step, tensors, skeleton, meta, reason)
            self._in_flight = (future, step, reason)
            return self.store.root / checkpoint_name(step)
        try:
            path = self._write(step, tensors, skeleton, meta, reason)
        except OSError as exc:
            self.failed_saves += 1
            self._failed(step, reason, f"Checkpoint at step {step} ({reason}) FAILED: {exc}. The temporary "
                                       "folder was removed and older checkpoints are intact")
            if strict:
                self.ranks.report_commit(str(exc))  # distributed hook: the other ranks fail too
                raise CheckpointError(f"could not save the {reason} checkpoint at step {step}: {exc}") from exc
            return None
        self._committed(step)
        if strict:
            self.ranks.report_commit(None)  # distributed hook: the group leaves the save together
        return path

    def _settle(self, *, block: bool) -> BaseException | None:
        """Account for the background write once it is done: a failure is counted and logged
        here, in the training thread, exactly once. Returns that write's error, if any."""
        if self._in_flight is None:
            return None
        future, step, reason = self._in_flight
        if not block and not future.done():
            return None
        self._in_flight = None
        error = future.exception()
        if isinstance(error, OwnershipLostError):
            raise error  # not a failed save to retry: this process must stop writing
        if error is None:
            self._committed(step)
            return None
        self.failed_saves += 1
        self._last_error = error
        self._failed(step, reason, f"Checkpoint at step {step} ({reason}) FAILED in the background: {error!r}")
        return error

    def _committed(self, step: int) -> None:
        self._last_error = None
        self.failures_in_row = 0
        self._retry_reason = None
        self._protected_step = step
        self._protected_time = self._clock()

    def _failed(self, step: int, reason: str, what: str) -> None:
        self.failures_in_row += 1
        self._retry_reason = reason
        newest = self.newest_verified
        logger.error(
            "%s. %d save(s) in a row did not commit (%d failed, %d skipped in all); the newest good "
            "checkpoint is %s; retrying at the next step boundary.",
            what, self.failures_in_row, self.failed_saves, self.skipped_saves,
            f"step {newest.step}" if newest else "none",
        )

    def _check_protected(self, step: int) -> None:
        """Raise CheckpointingStalledError when saves keep failing (see maybe_save)."""
        if self.failures_in_row == 0:
            return
        why = None
        if self.failures_in_row >= self.max_failed_saves:
            why = f"{self.failures_in_row} saves in a row failed or were skipped (checkpoint.max_failed_saves)"
        elif self.cadence.uses_steps and step - self._protected_step > self.max_unprotected * self.cadence.every_steps:
            why = (f"no checkpoint was committed for {step - self._protected_step} steps, more than "
                   f"{self.max_unprotected:g} x every_steps (checkpoint.max_unprotected)")
        elif (self.cadence.uses_time
              and self._clock() - self._protected_time > self.max_unprotected * self.cadence.every_seconds):
            why = (f"no checkpoint was committed for {self._clock() - self._protected_time:.0f} s, more than "
                   f"{self.max_unprotected:g} x every_seconds (checkpoint.max_unprotected)")
        if why is None:
            return
        newest = self.newest_verified
        raise CheckpointingStalledError(
            f"checkpointing is failing: {why}; stopping rather than training unprotected. "
            f"The newest good checkpoint is {newest.path if newest else 'none'}; see the errors above "
            f"(a full disk?), fix the cause and run the same command again to resume."
        )

    def _snapshot(self, step: int) -> tuple[dict[str, Any], Any]:
        """Deep CPU copy of every part, the RNGs and the extra state, taken at the boundary.

        The copy goes into the previous snapshot's tensors: only ``_save`` calls this, after
        waiting for the write in flight, so nothing reads them any more. The price is that
        one snapshot (the trainable state's size) stays in memory between saves.
        """
        state = {
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
            "rng": self.ranks.capture_rng(step),  # distributed hook: every rank's states, handed over
            "extra": self.extra_state() if self.extra_state is not None else None,
        }
        tensors, skeleton = flatten_state(state, reuse=self._snapshot_buffers)
        self._snapshot_buffers = tensors
        return tensors, skeleton

    def _write(self, step: int, tensors: dict, skeleton: Any, meta: dict, reason: str) -> Path:
        """Commit (may run in the writer thread), then apply retention."""
        path = self.store.save(step, tensors, skeleton, meta)
        size = self.store.size_of(path)
        self.last_saved = SavedCheckpoint(step=step, path=path, reason=reason, size_bytes=size)
        self.newest_verified = self.last_saved
        self._sound[path.name] = True
        logger.info("Saved checkpoint %s (%s, %.2f MB)", path.name, reason, size / 1e6)
        try:
            self._apply_retention(newest_verified=step)
        except OSError as exc:  # the new checkpoint is safe; an old one lingers until next time
            logger.warning("Retention after step %d failed: %s", step, exc)
        return path

    # ------------------------------------------------------------------ retention & space

    def _sound_checkpoints(self) -> dict[int, Path]:
        """The committed checkpoints that verify, by step. Corrupt or foreign folders do not
        count toward ``keep_last`` (they would push sound ones out). Each folder is hashed
        once per process; the ones this service wrote or restored are known sound."""
        sound = {}
        for path in self.store.list_checkpoints():
            if path.name not in self._sound:
                problems = self.store.verify(path)
                if problems:
                    logger.warning("Checkpoint %s does not verify and does not count toward keep_last: %s",
                                   path, "; ".join(problems))
                self._sound[path.name] = not problems
            if self._sound[path.name]:
                sound[parse_step(path.name)] = path
        return sound

    def _apply_retention(self, newest_verified: int) -> list[int]:
        sound = self._sound_checkpoints()
        deleted = []
        for step in self.retention.select_to_delete(sound, newest_verified):
            if self.store.delete(sound[step]):
                self._sound.pop(sound[step].name, None)
                deleted.append(step)
        if deleted:
            logger.info("Retention removed checkpoints at steps %s", deleted)
        return deleted

    def _ensure_space(self, step: int, needed: int) -> bool:
        if _free_bytes(self.store.root) >= needed:
            return True
        # Delete now what retention will delete anyway once this save is committed; never the
        # newest verified checkpoint, which may be all there is to resume from if this save fails.
        sound = self._sound_checkpoints()
        protect = self.newest_verified.step if self.newest_verified is not None else None
        doomed = [s for s in self.retention.select_to_delete([*sound, step], protect) if s != step]
        for old in doomed:
            if old == protect:
                continue
            if self.store.delete(sound[old]):
                self._sound.pop(sound[old].name, None)
                logger.warning("Low disk space: removed checkpoint step %d early to make room", old)
            if _free_bytes(self.store.root) >= needed:
                return True
        return False

    def _previous_size(self) -> int:
        if self.last_saved is not None:
            return self.last_saved.size_bytes
        if self._resumed_size:
            return self._resumed_size
        existing = self.store.list_checkpoints()
        return self.store.size_of(existing[-1]) if existing else 0

    # ------------------------------------------------------------------ resuming

    def resume(self, mode: str | Path = "auto", new_identity: Mapping[str, Any] | None = None) -> ResumeResult | None:
        """Restore the parts and RNGs from a checkpoint; ``None`` means a fresh start.

        ``mode``: ``"auto"`` (newest usable checkpoint of this run, or fresh if there is
        none), ``"never"`` (fresh; refuses a run folder that holds checkpoints) or a path (a
        checkpoint folder, or a run/checkpoints folder whose newest usable one is taken).
        A path only *seeds* this run: once the run has checkpoints of its own, the same path
        continues from them (a re-queued job makes progress), and a folder holding another
        history (checkpoints not forked from that path) is refused rather than written over.
        Raises CheckpointError when checkpoints exist but none is usable, or the config
        identity differs in a key that changes the saved state's shape.
        """
        identity = dict(self.config_identity if new_identity is None else new_identity)
        mode_str = str(mode)
        if mode_str == "never":
            self.store.cleanup_temporaries()
            existing = self.store.list_checkpoints()
            if existing:
                raise CheckpointError(
                    f"resume=never, but {self.store.root} already holds {len(existing)} checkpoint(s) "
                    f"({', '.join(p.name for p in existing)}). Choose another run_name for a fresh run, "
                    "or use resume=auto to continue this one."
                )
            self.cadence.mark_saved(0)
            return None
        if mode_str == "auto":
            found = _find_newest(self.store, cleanup=True)
            if found is None:
                self.cadence.mark_saved(0)
                return None
        else:
            source = str(Path(mode_str).expanduser().resolve())
            own = _find_newest(self.store, cleanup=True)
            if own is None:
                found = _find_explicit(Path(mode_str))
                logger.info("Forking a new history in %s from %s", self.run_dir, source)
            else:
                origin = own[1][2].get("forked_from")
                if origin != source:
                    raise CheckpointError(
                        f"resume={mode_str}, but {self.run_dir} already holds another history "
                        f"({own[0].name}, {'forked from ' + str(origin) if origin else 'not forked'}); "
                        "refusing to write over it. Choose another run_name for the fork, or use "
                        "resume=auto to continue the run that is there."
                    )
                logger.info("Continuing the fork of %s from its own newest checkpoint %s", source, own[0].name)
                found = own
            self.forked_from = source
        path, loaded, rejected = found
        return self._restore(path, loaded, rejected, identity)

    def resume_from(self, path: str | Path, new_identity: Mapping[str, Any] | None = None) -> ResumeResult:
        """Restore exactly the checkpoint at ``path``, verified, with no fork semantics: for the
        ranks of a group, which load the checkpoint rank 0 chose for the whole group."""
        identity = dict(self.config_identity if new_identity is None else new_identity)
        found_path, loaded, rejected = _find_explicit(Path(path))
        return self._restore(found_path, loaded, rejected, identity)

    def _restore(self, path: Path, loaded: tuple, rejected: list[tuple[Path, list[str]]],
                 identity: dict) -> ResumeResult:
        tensors, skeleton, manifest = loaded
        saved_world = manifest.get("world_size") or 1
        saved_world = saved_world if isinstance(saved_world, int) else 1
        if saved_world != self.world_size:  # distributed hook: data shards and RNG streams are per rank
            raise CheckpointError(
                f"cannot resume from {path}: it was written by a group of {saved_world} process(es) "
                f"(world_size={saved_world}) and this run has {self.world_size}. Each rank's prompts and "
                "random streams belong to the world size, so the run continues only with the same one: "
                + (f"launch it with `torchrun --nproc_per_node={saved_world} -m so8t.train …` (or nnodes x "
                   f"nproc_per_node = {saved_world})" if saved_world > 1 else
                   "launch it as one process (`so8t-train …`, or torchrun --nproc_per_node=1)")
                + ". A run at another world size is another run: give it its own run_name "
                "(or move this run's checkpoints away)."
            )

        saved_identity = manifest.get("config_identity") or {}
        if not isinstance(saved_identity, dict):  # verify() refuses it; a hand-made call might not
            raise CheckpointError(f"checkpoint {path} has a {MANIFEST_FILE} whose config_identity is not an object")
        # A checkpoint written before a config key was renamed compares under today's names.
        saved_identity = upgrade_identity(saved_identity)
        refusal = self.refuse_identity(saved_identity) if self.refuse_identity is not None else None
        if refusal:
            raise CheckpointError(f"cannot resume from {path}: {refusal}")
        refused, changed = compare_identity(saved_identity, identity, self.shape_keys)
        if refused:
            raise CheckpointError(
                f"cannot resume from {path}: the config changed in keys that change the saved "
                f"state ({describe_differences(refused, saved_identity, identity)}). "
                "Use another run_name for a run with this config, or go back to the old values "
                "to continue this one."
            )
        for key in changed:
            logger.warning(
                "Resuming with a changed config key (accepted): %s",
                describe_differences([key], saved_identity, identity),
            )

        try:
            state = unflatten_state(skeleton, tensors)
            saved_parts, saved_rng = state["parts"], state["rng"]
            if not isinstance(saved_parts, dict):
                raise TypeError("parts is not an object")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
            raise CheckpointError(
                f"checkpoint {path} has an inconsistent {path.name}/state.json: {str(exc)[:200]!r}") from exc
        missing = [name for name in self.parts if name not in saved_parts]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} does not cover {missing} (it covers {sorted(saved_parts)}); "
                "resuming would leave them at their initial state"
            )
        unused = [name for name in saved_parts if name not in self.parts]
        if unused:
            logger.warning("Checkpoint %s holds parts this run does not use: %s", path, unused)

        for name, part in self.parts.items():
            try:
                part.load_state_dict(saved_parts[name])
            except Exception as exc:
                raise CheckpointError(f"cannot restore part {name!r} from {path}: {exc}") from exc
        try:
            # Last, so nothing done while loading can advance the restored generators.
            self.ranks.restore_rng(saved_rng)  # distributed hook: each rank takes its own states
        except Exception as exc:
            raise CheckpointError(f"cannot restore the RNG state from {path}: {exc!r}") from exc

        step = int(manifest["step"])
        self.cadence.mark_saved(step)
        self._resumed_size = CheckpointStore(path.parent).size_of(path)
        if path.parent == self.store.root:
            self.newest_verified = SavedCheckpoint(step=step, path=path, reason=str(manifest.get("reason")),
                                                   size_bytes=self._resumed_size)
            self._sound[path.name] = True
            if self.forked_from is None:
                origin = manifest.get("forked_from")
                self.forked_from = origin if isinstance(origin, str) else None
        for bad, _ in rejected:
            if bad.parent == self.store.root:
                self._sound[bad.name] = False
        self._protected_step = step
        self._protected_time = self._clock()
        logger.info("Resumed from %s (step %d, saved for %s)", path, step, manifest.get("reason", "?"))
        return ResumeResult(
            step=step,
            path=path,
            reason=manifest.get("reason"),
            manifest=manifest,
            extra_state=state.get("extra"),
            changed_keys=changed,
            rejected=rejected,
        )


# ---------------------------------------------------------------------- candidate search


_Found = tuple[Path, tuple[dict, Any, dict], list[tuple[Path, list[str]]]]  # path, loaded, rejected


def _find_newest(store: CheckpointStore, *, cleanup: bool) -> _Found | None:
    """Newest usable checkpoint of ``store``: LATEST's target first (if it verifies), then by
    step, newest first. ``None`` if there are none; CheckpointError if none is usable."""
    if cleanup:
        store.cleanup_temporaries()
    candidates = store.list_checkpoints()
    if not candidates:
        return None

    # Newest commit first: each manifest carries a commit sequence, so a folder committed after
    # LATEST's target (its LATEST update failed) wins, and a higher-numbered folder from an
    # abandoned history loses. LATEST only breaks ties (checkpoints written before sequences).
    latest = store.read_latest()
    if latest is None:
        logger.warning("%s is missing or unreadable; choosing among checkpoints by commit order",
                       store.root / LATEST_FILE)
    elif not (store.root / latest).is_dir():
        logger.warning("%s names %s, which does not exist; ignoring it", store.root / LATEST_FILE, latest)
    # Folders with a malformed manifest go first only to be rejected with their reason logged.
    manifests = {p: _read_manifest_quietly(p) for p in candidates}
    ordered = sorted(candidates, reverse=True, key=lambda p: (
        _malformed(manifests[p]), manifest_sequence(manifests[p]), p.name == latest, parse_step(p.name)))

    rejected: list[tuple[Path, list[str]]] = []
    for path in ordered:
        problems = store.verify(path)
        if not problems:
            try:
                loaded = store.load(path)  # can still fail: a header safetensors refuses
            except CheckpointError as exc:
                problems = [str(exc)]
        if problems:
            note = " (named by LATEST)" if path.name == latest else ""
            logger.warning("Rejected checkpoint %s%s: %s", path, note, "; ".join(problems))
            rejected.append((path, problems))
            continue
        if rejected:
            logger.warning("Falling back to checkpoint %s", path)
        return path, loaded, rejected

    listing = "\n".join(f"  {p}: {'; '.join(probs)}" for p, probs in rejected)
    raise CheckpointError(
        f"{store.root} holds {len(rejected)} checkpoint(s) and none is usable; refusing to start "
        f"from scratch over them:\n{listing}\nMove them away (or use another run_name) to start fresh."
    )


def _find_explicit(path: Path) -> _Found:
    if (path / MANIFEST_FILE).exists() or parse_step(path.name) is not None:
        store = CheckpointStore(path.parent)
        problems = store.verify(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is not usable: {'; '.join(problems)}")
        return path, store.load(path), []
    for root in (path / "checkpoints", path):
        if (root / LATEST_FILE).exists() or any(parse_step(p.name) is not None for p in _children(root)):
            # Another run's folder: read it, but leave its temporaries alone.
            found = _find_newest(CheckpointStore(root), cleanup=False)
            if found is not None:
                return found
    raise CheckpointError(f"resume path {path} is not a checkpoint folder and holds no checkpoints")


def _malformed(manifest: Any) -> bool:
    """No manifest object, or a sequence that is not a number: rejected by verify()."""
    if not isinstance(manifest, dict):
        return True
    sequence = manifest.get("sequence", 0)
    return not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0


def _read_manifest_quietly(path: Path) -> Any:
    try:
        return json.loads((path / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _children(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _free_bytes(path: Path) -> float:
    """Free bytes on the file system of ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return float("inf")  # cannot tell: let the write itself find out

