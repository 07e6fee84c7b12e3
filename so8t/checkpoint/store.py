"""How checkpoints sit on disk: atomic commit, manifest, verification, loading.

Layout under ``root`` (``<run_dir>/checkpoints``)::

    step_00000040/
        state.safetensors   every tensor, flat names (weights, optimizer moments, torch RNG)
        state.json          the rest: a skeleton saying where each tensor goes, plus scalars
        MANIFEST.json       written last: each file's size and sha256, step, what it covers …
    LATEST                  name of the newest committed folder, replaced atomically

A checkpoint is complete or it does not exist: everything is written into a dot-named
temporary folder next to the final one (same file system, so the rename is atomic), each
file fsynced, the manifest last, then the folder is renamed into place, the parent folder
fsynced, and only then ``LATEST`` is moved. A crash at any instant leaves either the old set
of checkpoints plus a temporary folder (removed by :meth:`CheckpointStore.cleanup_temporaries`)
or the new one.

The store knows nothing about what the tensors mean: it saves a flat tensor dict, a JSON
document and free-form manifest metadata given by the caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import secrets
import struct
import sys
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import safetensors.torch
import torch

from so8t.checkpoint.errors import CheckpointError
from so8t.run.atomic import atomic_write_text, fsync_dir, remove_tree, replace_path, swap_dir_in
from so8t.run.faults import fail_point, pause_point

__all__ = [
    "CheckpointStore",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "TENSORS_FILE",
    "STATE_FILE",
    "LATEST_FILE",
    "checkpoint_name",
    "parse_step",
    "library_versions",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "so8t-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "MANIFEST.json"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "LATEST"

# Leftovers of an interrupted operation; all start with "." so they never match step_*.
TMP_PREFIX = ".tmp-"  # a save in progress
OLD_PREFIX = ".old-"  # a committed folder moved aside while the same step is re-saved
DEL_PREFIX = ".del-"  # a folder being deleted by retention

_NAME_RE = re.compile(r"^step_(\d{8,})$")
# Manifest keys the store owns; caller metadata may not override them.
_RESERVED = frozenset({"format", "format_version", "step", "sequence", "created", "created_unix", "files", "versions"})
_HASH_CHUNK = 1 << 20


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint folder name, or ``None`` if it is not one."""
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Versions recorded in every manifest (read from package metadata: no heavy imports)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": version("safetensors"),
        "numpy": version("numpy"),
        "transformers": version("transformers"),
        "so8t": version("so8t"),
        "platform": sys.platform,
    }


class CheckpointStore:
    def __init__(self, root: str | os.PathLike[str], fence: Any = None) -> None:
        """``fence``: called right before each commit (and each ``LATEST`` move or deletion);
        it raises when this process no longer owns the run (see so8t.run.lock.check_owner)."""
        self.root = Path(root)
        self.fence = fence or (lambda: None)

    # ------------------------------------------------------------------ write

    def save(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        state: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Commit ``step_{step:08d}/`` atomically and point ``LATEST`` at it.

        ``tensors`` must be contiguous CPU tensors the caller no longer mutates (a snapshot);
        ``state`` any JSON-able document; ``meta`` extra JSON-able manifest keys (what the
        checkpoint covers, config identity, save reason …). On any error the temporary
        folder is removed, older checkpoints are untouched, and the error is re-raised.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        meta = dict(meta or {})
        clash = _RESERVED & set(meta)
        if clash:
            raise ValueError(f"manifest keys {sorted(clash)} are reserved for the store")

        name = checkpoint_name(step)
        final = self.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        sequence = self.next_sequence()
        tmp.mkdir()
        try:
            pause_point("save.tmp_created")
            files = {TENSORS_FILE: _write_tensors(tmp / TENSORS_FILE, tensors)}
            pause_point("save.tensors_written")
            # allow_nan: Python reads NaN/Infinity back; refusing would crash a save
            # over one diverged scalar, which is exactly when a checkpoint matters.
            fail_point("checkpoint.state")
            files[STATE_FILE] = _write_durable(tmp / STATE_FILE, _json_bytes(state))
            pause_point("save.state_written")
            now = time.time()
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "step": step,
                "sequence": sequence,
                **meta,
                "files": files,
                "versions": library_versions(),
                "created": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
                "created_unix": now,
            }
            fail_point("checkpoint.manifest")
            _write_durable(tmp / MANIFEST_FILE, _json_bytes(manifest, indent=2))
            pause_point("save.manifest_written")
            fsync_dir(tmp)
            pause_point("save.tmp_synced")
            self.fence()
            self._commit(tmp, final)
        except BaseException:
            remove_tree(tmp)
            raise
        pause_point("save.committed")
        # LATEST is only a hint (resume orders checkpoints by their commit sequence): the
        # checkpoint is committed and durable now, so failing to move the hint is no failure.
        try:
            self.fence()
            self.write_latest(name)
        except OSError as exc:
            logger.error("Committed checkpoint %s but could not update %s: %s (resume still finds it: "
                         "checkpoints are ordered by their commit sequence)", name, LATEST_FILE, exc)
        pause_point("save.latest_written")
        logger.debug("Committed checkpoint %s", final)
        return final

    def next_sequence(self) -> int:
        """1 + the highest commit sequence among the manifests here: a counter that orders
        checkpoints by commit time without trusting a clock or the LATEST file."""
        highest = 0
        for path in self.list_checkpoints():
            highest = max(highest, manifest_sequence(_read_json(path / MANIFEST_FILE)))
        return highest + 1

    def _commit(self, tmp: Path, final: Path) -> None:
        # An existing folder — the same step saved again after a resume — is moved aside
        # first; cleanup_temporaries() puts it back if we crash before the new one is in.
        aside = self.root / f"{OLD_PREFIX}{final.name}-{secrets.token_hex(4)}"
        swap_dir_in(tmp, final, aside, renamed=lambda: pause_point("save.renamed"))

    def write_latest(self, name: str) -> None:
        atomic_write_text(self.root / LATEST_FILE, name + "\n", fault_site="checkpoint.latest")

    def delete(self, path: str | os.PathLike[str]) -> bool:
        """Delete a checkpoint folder this store wrote; refuse (and return False) otherwise."""
        path = Path(path)
        if path.parent != self.root or parse_step(path.name) is None or path.is_symlink() or not path.is_dir():
            logger.warning("Not deleting %s: not a checkpoint folder of %s", path, self.root)
            return False
        manifest = _read_json(path / MANIFEST_FILE)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            logger.warning("Not deleting %s: it has no manifest written by SO8T", path)
            return False
        self.fence()
        # Rename first so a crash mid-delete never leaves a half-empty folder under a
        # committed name.
        doomed = self.root / f"{DEL_PREFIX}{path.name}-{secrets.token_hex(4)}"
        replace_path(path, doomed)
        fsync_dir(self.root)
        remove_tree(doomed)
        return True

    def cleanup_temporaries(self) -> list[Path]:
        """Remove what an interrupted save or delete left behind; log each one."""
        if not self.root.is_dir():
            return []
        removed: list[Path] = []
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(OLD_PREFIX):
                original = self.root / name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
                if parse_step(original.name) is not None and not original.exists():
                    # The crash came between moving the old copy aside and moving the new
                    # one in: the old copy is a complete checkpoint, so put it back.
                    logger.warning("Restoring checkpoint %s left aside by an interrupted re-save", original.name)
                    replace_path(entry, original)
                    continue
                logger.warning("Removing %s left aside by an interrupted re-save", entry)
            elif name.startswith(TMP_PREFIX):
                logger.warning("Removing incomplete checkpoint %s left by an interrupted save", entry)
            elif name.startswith(DEL_PREFIX):
                logger.warning("Removing %s left by an interrupted delete", entry)
            elif name.startswith(f".{LATEST_FILE}.") and name.endswith(".tmp"):
                logger.warning("Removing %s left by an interrupted LATEST update", entry)
            else:
                continue
            remove_tree(entry)
            removed.append(entry)
        if removed:
            fsync_dir(self.root)
        return removed

    # ------------------------------------------------------------------ read

    def list_checkpoints(self) -> list[Path]:
        """Committed ``step_*`` folders, oldest step first. Not verified: see :meth:`verify`."""
        if not self.root.is_dir():
            return []
        found = [(parse_step(p.name), p) for p in self.root.iterdir() if p.is_dir() or p.is_symlink()]
        return [p for step, p in sorted((s, p) for s, p in found if s is not None)]

    def read_latest(self) -> str | None:
        """The folder name ``LATEST`` holds, or ``None`` if it is missing or unreadable."""
        path = self.root / LATEST_FILE
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("Ignoring unreadable %s: %s", path, exc)
            return None
        if parse_step(text) is None:
            logger.warning("Ignoring %s: %r is not a checkpoint folder name", path, text[:80])
            return None
        return text

    def verify(self, path: str | os.PathLike[str]) -> list[str]:
        """Problems that make the checkpoint at ``path`` unusable; empty if it is sound."""
        path = Path(path)
        # A link could point anywhere (another run, a file an attacker controls): only real
        # folders and files count as a checkpoint's.
        if path.is_symlink():
            return [f"{path.name} is a symbolic link, not a checkpoint folder"]
        if not path.is_dir():
            return [f"{path.name} is not a folder"]
        manifest_path = path / MANIFEST_FILE
        if manifest_path.is_symlink():
            return [f"{MANIFEST_FILE} is a symbolic link"]
        if not manifest_path.is_file():
            return [f"missing {MANIFEST_FILE}"]
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            return [f"unparsable {MANIFEST_FILE}: {str(exc)[:200]}"]
        if not isinstance(manifest, dict):
            return [f"unparsable {MANIFEST_FILE}: not a JSON object"]

        problems: list[str] = []
        if manifest.get("format") != FORMAT_NAME:
            problems.append(f"{MANIFEST_FILE} format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            problems.append(f"format_version {version!r} is not readable by this SO8T (reads <= {FORMAT_VERSION})")
        name_step = parse_step(path.name)
        step = manifest.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            problems.append(f"{MANIFEST_FILE} step {step!r} is not a step number")
        elif name_step is not None and step != name_step:
            problems.append(f"step mismatch: folder says {name_step}, manifest says {step!r}")
        if not isinstance(manifest.get("config_identity", {}), dict):
            problems.append(f"{MANIFEST_FILE} config_identity is not a JSON object")
        sequence = manifest.get("sequence", 0)
        if not isinstance(sequence, int) or isinstance(sequence, bool):
            problems.append(f"{MANIFEST_FILE} sequence {sequence!r} is not a number")

        files = manifest.get("files")
        if not isinstance(files, dict):
            return problems + [f"{MANIFEST_FILE} lists no files"]
        for required in (TENSORS_FILE, STATE_FILE):
            if required not in files:
                problems.append(f"{MANIFEST_FILE} does not list {required}")
        for name, entry in files.items():
            # Names come from a file on disk: never let one point outside the folder.
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                problems.append(f"{MANIFEST_FILE} lists an invalid file name {name!r}")
                continue
            if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
                problems.append(f"{MANIFEST_FILE} entry for {name} lacks size or sha256")
                continue
            file = path / name
            try:  # a permission error (or EIO) on one file makes the checkpoint unusable, no more
                if file.is_symlink():
                    problems.append(f"{name} is a symbolic link")
                    continue
                if not file.is_file():
                    problems.append(f"missing file {name}")
                    continue
                size = file.stat().st_size
            except OSError as exc:
                problems.append(f"cannot read {name}: {exc}")
                continue
            if size != entry["size"]:
                problems.append(f"size mismatch for {name}: {size} bytes on disk, {entry['size']} in manifest")
                continue
            try:
                digest = _sha256_file(file)
            except OSError as exc:
                problems.append(f"cannot read {name}: {exc}")
                continue
            if digest != entry["sha256"]:
                problems.append(f"sha256 mismatch for {name}")
        return problems

    def read_manifest(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        manifest = _read_json(Path(path) / MANIFEST_FILE)
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{Path(path) / MANIFEST_FILE} is missing or unparsable")
        return manifest

    def load(self, path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
        """``(tensors, state, manifest)`` of the checkpoint at ``path``.

        Does not verify (call :meth:`verify` first; hashing twice would double resume
        time). Tensors are read from bytes rather than memory-mapped, so no file stays open:
        on Windows an open file would block deleting the folder later.
        """
        path = Path(path)
        try:
            manifest = self.read_manifest(path)
            state = json.loads((path / STATE_FILE).read_bytes())
            tensors = safetensors.torch.load((path / TENSORS_FILE).read_bytes())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
        return tensors, state, manifest

    def size_of(self, path: str | os.PathLike[str]) -> int:
        """Bytes on disk of the checkpoint folder at ``path`` (0 if unreadable)."""
        try:
            return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
        except OSError:
            return 0


# ---------------------------------------------------------------------- helpers


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    return (json.dumps(obj, indent=indent, allow_nan=True) + "\n").encode("utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def manifest_sequence(manifest: Any) -> int:
    """The commit sequence of a manifest (0 when absent or malformed: written before it existed)."""
    value = manifest.get("sequence", 0) if isinstance(manifest, dict) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _write_durable(path: Path, data: bytes | _Buffers) -> dict[str, Any]:
    """Write ``data`` to a new file, fsync it; return its manifest entry (hashed as written)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "xb") as f:
        for chunk in data if isinstance(data, _Buffers) else (data,):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


class _Buffers:
    """The bytes of a file given as a list of buffers, written and hashed without joining them."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = [view for view in (memoryview(p).cast("B") for p in parts) if view.nbytes]

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.parts)

    def __len__(self) -> int:
        return sum(view.nbytes for view in self.parts)

    def __getitem__(self, index: slice) -> bytes:  # joins a copy: for tests and small files only
        return b"".join(self.parts)[index]


# The safetensors names of the dtypes a checkpoint holds; any other dtype (or a big-endian
# machine) goes through safetensors.torch.save instead.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    # Written and hashed straight from the snapshot's memory, tensor by tensor, in the
    # safetensors format (an 8-byte header length, a JSON header, the raw little-endian data).
    # Not safetensors.torch.save: it builds the whole file as one bytes object first (a
    # transient copy of the state) while holding the GIL for most of it (~0.5 s per 300 MB),
    # which stalls the training thread during a background write; file writes and sha256
    # release the GIL. Not safetensors.save_file either: its errors arrive as SafetensorError
    # (a full disk would not be an OSError with errno 28) and it adds its own temporary file.
    fail_point("checkpoint.tensors")
    return _write_durable(path, _safetensors_buffers(tensors))


def _safetensors_buffers(tensors: Mapping[str, torch.Tensor]) -> bytes | _Buffers:
    # Widest elements first, as safetensors orders them: every tensor then starts at a
    # multiple of its element size (the header is padded to 8), so readers can map it in place.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    if sys.byteorder != "little" or any(
        tensors[n].dtype not in _SAFETENSORS_DTYPES or tensors[n].device.type != "cpu" for n in names
    ):
        return safetensors.torch.save(dict(tensors))
    header: dict[str, Any] = {}
    data: list[Any] = []
    offset = 0
    for name in names:
        tensor = tensors[name].detach()
        tensor = tensor if tensor.is_contiguous() else tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        if nbytes:
            data.append(tensor.reshape(-1).view(torch.uint8).numpy())  # a view: no copy
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return _Buffers([struct.pack("<Q", len(head)), head, *data])


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
