"""Reads the history rows of W&B's local run files (``wandb/*run-*-<id>/run-<id>.wandb``).

A resumed run needs to know which steps W&B already holds: W&B writes its run file from a
buffer (every 15 s by default), so a ``kill -9`` loses the updates of the last seconds, and W&B
offers no call that says what it has. wandb ≥ 0.20 reads these files only in its Go core
(``wandb sync``) and ships no Python reader, so this hand-written one follows the file's framing
— LevelDB's log format behind a ``:W&B`` header: 32 KiB blocks of chunks, each
``crc32c (4) | length (2, little-endian) | type (1)`` then data, type 1 a whole record, 2/3/4 its
first/middle/last part — and decodes each record with W&B's own protobuf schema
(``wandb.proto.wandb_internal_pb2.Record``). A damaged tail (a kill mid-write) ends the read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

__all__ = ["history", "last_step", "run_files"]

_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B", magic 0xBEE1, version
_CHUNK = 7


def _chunks(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        return
    pos, parts = _HEADER, b""
    while pos + _CHUNK <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK])
        if kind == 0 and length == 0:  # zero padding: the rest of this block is empty
            pos += left
            continue
        body = data[pos + _CHUNK:pos + _CHUNK + length]
        if len(body) < length:  # cut off by a kill mid-write
            return
        pos += _CHUNK + length
        if kind == 1:
            yield body
        elif kind == 2:
            parts = body
        elif kind == 3:
            parts += body
        elif kind == 4:
            yield parts + body


def history(path: str | Path) -> list[dict]:
    """The ``run.log`` rows of one ``.wandb`` file, in the order they were written."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in _chunks(Path(path).read_bytes()):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:
            break
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_files(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """The local run files (offline or online) of one W&B run id, oldest attempt first."""
    files = Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb")
    # Sort by the start time after "run-", whatever the offline- prefix.
    return sorted(files, key=lambda f: f.parent.name.split("run-", 1)[1])


def last_step(wandb_dir: str | Path, run_id: str) -> int:
    """The highest step the local files of a W&B run hold (0 when none)."""
    steps = [row.get("_step") for file in run_files(wandb_dir, run_id) for row in history(file)]
    return max((s for s in steps if isinstance(s, int)), default=0)
