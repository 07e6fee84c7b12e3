"""The checkpoint service a training loop talks to at step boundaries.

It ties the pieces together — policy (when), state capture (what), store (how), writer
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

from so8t.checkpoint.errors import CheckpointError
from so8t.checkpoint.identity import DEFAULT_SHAPE_KEYS, compare_identity, describe_differences
from so8t.checkpoint.policy import SavePolicy
from so8t.checkpoint.retention import Retention
from so8t.checkpoint.state import capture_rng, flatten_state, restore_rng, tensor_bytes, unflatten_state
from so8t.checkpoint.store import (
    LATEST_FILE,
    MANIFEST_FILE,
    CheckpointStore,
    checkpoint_name,
    parse_step,
)
from so8t.checkpoint.writer import AsyncCheckpointWriter

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
    ) -> None:
        """
        ``cfg``: a ``CheckpointConfig``-like object (attribute access). ``parts``: name →
        object with ``state_dict()``/``load_state_dict()``. ``config_identity``: flat dict of
        the result-shaping config keys, neutral keys (hardware, logging, checkpoint cadence,
        ``max_steps`` …) already removed by the caller — see :mod:`so8t.checkpoint.identity`.
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
        self.world_size = world_size if world_size is not None else _world_size()
        self.store = CheckpointStore(self.run_dir / "checkpoints")
        self.policy = SavePolicy(cfg.policy, cfg.every_seconds, cfg.every_steps, clock=clock)
        self.retention = Retention(cfg.keep_last, cfg.keep_every_steps)
        self.writer = AsyncCheckpointWriter() if cfg.async_write else None
        self.last_saved: SavedCheckpoint | None = None
        self._resumed_size = 0
        self._closed = False
        # The tensors of the previous snapshot, overwritten by the next one (see _snapshot).
        self._snapshot_buffers: dict[str, Any] = {}

    # ------------------------------------------------------------------ saving

    def maybe_save(self, step: int) -> Path | None:
        """Save if the policy says so. Returns the checkpoint's path (for an async write,
        the path it will have once committed), or ``None`` if nothing was saved.

        Never raises for a full disk or an I/O error: it logs loudly and training goes on;
        the older checkpoints stay intact. A skipped or failed save waits for the next
        cadence rather than retrying every step.
        """
        reason = self.policy.due(step)
        if reason is None:
            return None
        return self._save(step, reason, background=self.writer is not None, strict=False)

    def save_now(self, step: int, reason: str) -> Path:
        """Save synchronously (final, signal, deadline saves); raise CheckpointError on failure."""
        if reason not in SAVE_REASONS:
            raise ValueError(f"reason must be one of {SAVE_REASONS}, got {reason!r}")
        path = self._save(step, reason, background=False, strict=True)
        assert path is not None
        return path

    def wait(self) -> BaseException | None:
        """Wait for the background write in flight, if any; return its error."""
        return self.writer.wait() if self.writer is not None else None

    def close(self) -> None:
        """Finish the write in flight; raise CheckpointError if the last write failed."""
        if self._closed or self.writer is None:
            self._closed = True
            return
        self._closed = True
        error = self.writer.close()
        if error is not None:
            raise CheckpointError(
                f"the last background checkpoint write failed ({error!r}); "
                f"the newest usable checkpoint is {self.last_saved.path if self.last_saved else 'an older one'}"
            ) from error

    def _save(self, step: int, reason: str, *, background: bool, strict: bool) -> Path | None:
        # One write in flight: the next save waits here, and the free-space figure below
        # then includes the previous checkpoint.
        self.wait()
        self.policy.mark_saved(step)

        tensors, skeleton = self._snapshot()
        needed = int(SPACE_MARGIN * max(self._previous_size(), tensor_bytes(tensors)))
        if not self._ensure_space(step, needed):
            message = (
                f"Low disk space: {_free_bytes(self.store.root) / 1e6:.1f} MB free in {self.store.root}, "
                f"a checkpoint needs about {needed / 1e6:.1f} MB"
            )
            if not strict:
                logger.warning("%s; SKIPPING the checkpoint at step %d, training goes on", message, step)
                return None
            logger.warning("%s; trying the %s save at step %d anyway", message, reason, step)

        meta = {
            "reason": reason,
            "covers": [*self.parts, "rng"] + (["extra"] if self.extra_state is not None else []),
            "part_types": {name: type(part).__qualname__ for name, part in self.parts.items()},
            "config_identity": self.config_identity,
            "world_size": self.world_size,
        }
        if background:
            assert self.writer is not None
            self.writer.submit(self._write, step, tensors, skeleton, meta, reason)
            return self.store.root / checkpoint_name(step)
        try:
            return self._write(step, tensors, skeleton, meta, reason)
        except OSError as exc:
            logger.error(
                "Checkpoint at step %d (%s) FAILED: %s. The temporary folder was removed and "
                "older checkpoints are intact.", step, reason, exc, exc_info=True,
            )
            if strict:
                raise CheckpointError(f"could not save the {reason} checkpoint at step {step}: {exc}") from exc
            return None

    def _snapshot(self) -> tuple[dict[str, Any], Any]:
        """Deep CPU copy of every part, the RNGs and the extra state, taken at the boundary.

        The copy goes into the previous snapshot's tensors: only ``_save`` calls this, after
        waiting for the write in flight, so nothing reads them any more. The price is that
        one snapshot (the trainable state's size) stays in memory between saves.
        """
        state = {
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
            "rng": capture_rng(),
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
        logger.info("Saved checkpoint %s (%s, %.2f MB)", path.name, reason, size / 1e6)
        try:
            self._apply_retention(newest_verified=step)
        except OSError as exc:  # the new checkpoint is safe; an old one lingers until next time
            logger.warning("Retention after step %d failed: %s", step, exc)
        return path

    # ------------------------------------------------------------------ retention & space

    def _apply_retention(self, newest_verified: int) -> list[int]:
        existing = {parse_step(p.name): p for p in self.store.list_checkpoints()}
        deleted = []
        for step in self.retention.select_to_delete(existing, newest_verified):
            if self.store.delete(existing[step]):
                deleted.append(step)
        if deleted:
            logger.info("Retention removed checkpoints at steps %s", deleted)
        return deleted

    def _ensure_space(self, step: int, needed: int) -> bool:
        if _free_bytes(self.store.root) >= needed:
            return True
        # Delete now what retention will delete anyway once this save is committed.
        existing = {parse_step(p.name): p for p in self.store.list_checkpoints()}
        protect = self._newest_known_good(existing)
        doomed = [s for s in self.retention.select_to_delete([*existing, step], protect) if s != step]
        for old in doomed:
            if self.store.delete(existing[old]):
                logger.warning("Low disk space: removed checkpoint step %d early to make room", old)
            if _free_bytes(self.store.root) >= needed:
                return True
        return False

    def _newest_known_good(self, existing: Mapping[int, Path]) -> int | None:
        if self.last_saved is not None:
            return self.last_saved.step
        latest = self.store.read_latest()
        if latest is not None:
            return parse_step(latest)
        return max(existing) if existing else None

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
            self.policy.mark_saved(0)
            return None
        if mode_str == "auto":
            found = _find_newest(self.store, cleanup=True)
            if found is None:
                self.policy.mark_saved(0)
                return None
        else:
            found = _find_explicit(Path(mode_str))
        path, loaded, rejected = found
        return self._restore(path, loaded, rejected, identity)

    def _restore(self, path: Path, loaded: tuple, rejected: list[tuple[Path, list[str]]],
                 identity: dict) -> ResumeResult:
        tensors, skeleton, manifest = loaded

        saved_identity = manifest.get("config_identity") or {}
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
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} has an inconsistent {path.name}/state.json: {exc!r}") from exc
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
            restore_rng(saved_rng)
        except Exception as exc:
            raise CheckpointError(f"cannot restore the RNG state from {path}: {exc!r}") from exc

        step = int(manifest["step"])
        self.policy.mark_saved(step)
        self._resumed_size = CheckpointStore(path.parent).size_of(path)
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

    # LATEST is trusted over names: after a resume from an older checkpoint, a higher-numbered
    # folder may belong to an abandoned history. But it is only a hint: checked like the rest.
    ordered = list(reversed(candidates))
    latest = store.read_latest()
    if latest is None:
        logger.warning("%s is missing or unreadable; choosing among checkpoints by step", store.root / LATEST_FILE)
    elif not (store.root / latest).is_dir():
        logger.warning("%s names %s, which does not exist; ignoring it", store.root / LATEST_FILE, latest)
    else:
        ordered.sort(key=lambda p: p.name != latest)  # stable: LATEST first, then newest first

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


def _world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:  # a broken distributed setup is not the checkpoint's business
        pass
    return 1
