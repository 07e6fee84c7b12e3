"""A folder written once and then trusted (a run's ``final/``): durable, with a manifest to verify.

``write_manifest`` hashes every file below the folder into ``MANIFEST.json``; the folder is
written aside and renamed into place by :func:`so8t.run.atomic.write_dir_atomically`, which
fsyncs it all first, so a power cut cannot leave a ``final/`` that looks complete but is not.
``verify_folder`` says what is wrong with one; ``so8t-train`` only calls a run completed when it
says nothing.

Hand-written: the checkpoint store's manifest is flat and specific to checkpoints; this one
covers a tree (the tokenizer is a sub-folder) and is a few lines of hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from so8t.run.faults import fail_point

__all__ = ["MANIFEST_NAME", "write_manifest", "verify_folder"]

MANIFEST_NAME = "MANIFEST.json"
FORMAT = "so8t-folder"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike[str]) -> dict:
    """Hash every file below ``folder`` into ``MANIFEST.json`` (made durable by the folder's
    atomic write, not here)."""
    folder = Path(folder)
    fail_point("final")
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link; {folder} must hold plain files only")
        if path.is_dir():
            continue
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "files": files}
    with open(folder / MANIFEST_NAME, "xb") as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def verify_folder(folder: str | os.PathLike[str]) -> list[str]:
    """Problems that make ``folder`` untrustworthy; empty if every listed file is intact."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return [f"{folder} is not a folder"]
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        return [f"{folder} has no {MANIFEST_NAME}"]
    except (OSError, ValueError, RecursionError) as exc:
        return [f"{folder / MANIFEST_NAME} is unreadable: {str(exc)[:200]}"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
        return [f"{folder / MANIFEST_NAME} is not a manifest of this format"]
    problems = []
    for name, entry in files.items():
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or Path(name).is_absolute() or ".." in parts:
            problems.append(f"invalid file name {name!r} in {MANIFEST_NAME}")
            continue
        path = folder / name
        if not isinstance(entry, dict):
            problems.append(f"{name}: bad manifest entry")
        elif path.is_symlink() or not path.is_file():
            problems.append(f"{name} is missing or not a plain file")
        else:
            try:
                if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
                    problems.append(f"{name} differs from its manifest entry")
            except OSError as exc:
                problems.append(f"cannot read {name}: {exc}")
    return problems
