"""A fingerprint of the frozen base model, so a checkpoint is never resumed on another one.

``model.path`` alone does not say which weights a run trained on: the folder can be
replaced, the hub cache can hold a newer revision. The fingerprint records

* ``model.config_fingerprint`` - sha256 of the model's ``config.json`` (canonical JSON, the
  transformers version stamp left out);
* ``model.weights_fingerprint`` - the hub revision when the model came from the hub cache,
  and, for every weights file, its name, its size and the sha256 of 16 blocks of 64 KiB
  spread evenly through it.

Hashing the whole of a 7.6 GB model would take about 40 s at every start; 1 MiB of samples
per file takes milliseconds and still changes when the weights do (every retrained or
re-initialised tensor touches the sampled blocks of a file of its size), and the size
changes with any change of shape or dtype.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BLOCKS = 16
BLOCK_BYTES = 64 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Keys of config.json that say how it was written, not what the model is.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


def model_folder(model_cfg: Any) -> tuple[Path, str | None]:
    """The folder the base model is loaded from, and its hub revision if it came from the cache."""
    from so8t.model.tiny import TINY_DIR

    kind, path = model_cfg.kind, getattr(model_cfg, "path", None)
    if kind == "tiny":
        return TINY_DIR, None
    folder = Path(str(path)).expanduser()
    if folder.is_dir():
        return folder, None
    from transformers.utils import cached_file

    config_file = cached_file(str(path), "config.json", local_files_only=True)
    snapshot = Path(config_file).parent  # .../snapshots/<revision>/
    return snapshot, snapshot.name


def sampled_digest(file: Path) -> str:
    """sha256 of the file's size and of BLOCKS evenly spaced blocks of BLOCK_BYTES."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as handle:
        if size <= BLOCKS * BLOCK_BYTES:
            digest.update(handle.read())
        else:
            step = (size - BLOCK_BYTES) // (BLOCKS - 1)
            for i in range(BLOCKS):
                handle.seek(i * step)
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


def base_model_fingerprint(model_cfg: Any) -> dict[str, str]:
    """``{"model.config_fingerprint": ..., "model.weights_fingerprint": ...}`` of the base model."""
    folder, revision = model_folder(model_cfg)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    config_digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    weights = hashlib.sha256((revision or "").encode())
    # resolve(): the hub cache keeps files as links into its blob store.
    for file in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        weights.update(f"{file.name}:{sampled_digest(file.resolve())}".encode())
    return {"model.config_fingerprint": config_digest[:16], "model.weights_fingerprint": weights.hexdigest()[:16]}
