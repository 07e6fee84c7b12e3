"""Turning live state into something a checkpoint can hold, and back.

Two jobs:

* RNG capture/restore for python ``random``, numpy's global generator, torch CPU and every
  CUDA device.
* Splitting any nested ``state_dict()`` (a module's, an optimizer's with tensors inside
  nested dicts and lists, a scheduler's, the RNG dict above) into a flat ``{name: tensor}``
  dict for safetensors plus a JSON skeleton that says where each tensor goes — so no pickle
  is ever written or loaded.

The skeleton is a hand-written encoding because JSON has no tuples, no non-string keys and
no tensors, and an optimizer state needs all three (``betas`` is a tuple, ``state`` is keyed
by int). Markers are single-key objects; a real dict that could be mistaken for one is
stored in the pair form, so decoding is never ambiguous. Python's ``json`` writes floats
with ``repr`` and reads them back to the same bits, so scalars survive exactly.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "capture_rng",
    "restore_rng",
    "flatten_state",
    "unflatten_state",
    "snapshot_tensor",
    "tensor_bytes",
]

logger = logging.getLogger(__name__)

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_DICT = "__dict__"  # pair form: [[key, value], ...]; keys may be any encodable hashable
_META = "__meta__"  # an OrderedDict's ``_metadata`` (module state_dict versions)
_NPSCALAR = "__npscalar__"
_MARKERS = frozenset({_TENSOR, _NDARRAY, _TUPLE, _DICT, _META, _NPSCALAR})

_JSON_SCALARS = (bool, int, float, str, type(None))
# Exactly these types (not NumPy's scalar subclasses of float and int, which keep their dtype).
_PLAIN_SCALARS = frozenset({str, int, float, bool, type(None)})


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Every RNG that can shape the future of a run; tensors for torch, plain lists otherwise."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "cuda": [],
    }
    # Only once CUDA is initialised: before that its generators have produced nothing, and
    # asking for their state would create a CUDA context in a CPU-only run.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng` took. Accepts lists where tuples were (JSON)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))

    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )

    torch.set_rng_state(_as_byte_tensor(state["torch_cpu"]))

    cuda = list(state.get("cuda") or [])
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) != have:
            # Another hardware profile is allowed on resume; the run is then reproducible
            # only as far as the devices match, which is worth saying.
            logger.warning(
                "Checkpoint holds RNG state for %d CUDA device(s), this machine has %d; "
                "restoring the first %d.", len(cuda), have, min(len(cuda), have)
            )
        for index in range(min(len(cuda), have)):
            torch.cuda.set_rng_state(_as_byte_tensor(cuda[index]), device=index)


def _as_byte_tensor(value: Any) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.uint8)
    return tensor.detach().to("cpu", dtype=torch.uint8).contiguous()


# --------------------------------------------------------------------------- flatten


def snapshot_tensor(tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous CPU copy that training can no longer mutate in place.

    ``out``: a CPU tensor nobody reads any more (an earlier snapshot's); if its dtype and
    shape match it is overwritten and returned instead of allocating a new copy.
    """
    tensor = tensor.detach()
    if (
        out is not None
        and out.device.type == "cpu"
        and out.dtype == tensor.dtype
        and out.shape == tensor.shape
        and out.is_contiguous()
    ):
        return out.copy_(tensor)
    if tensor.device.type == "cpu":
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor.to("cpu").contiguous()


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def flatten_state(
    obj: Any, prefix: str = "", reuse: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into ``({name: CPU tensor copy}, JSON-able skeleton)``.

    Every tensor is copied (see :func:`snapshot_tensor`) and every container rebuilt, so the
    result is a deep snapshot: the caller may keep training and mutate ``obj``.
    Names follow the path (``parts.optimizer.state.0.exp_avg``) to make files readable.

    ``reuse``: the tensors of an earlier snapshot that nobody reads any more; each copy goes
    into the tensor of the same name when dtype and shape match. Copying into memory already
    in use is several times cheaper than a fresh allocation, whose pages the kernel must
    fault in and zero first (300 MB of LoRA + Adam state, one thread: ~45 ms against
    45–250 ms, depending on whether the allocator hands back pages it still holds).
    """
    reuse = reuse or {}
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: list[str]) -> str:
        base = ".".join(p for p in [prefix, *path] if p) or "tensor"
        name, n = base, 1
        while name in tensors:  # only if keys themselves contain dots and collide
            n += 1
            name = f"{base}#{n}"
        return name

    def encode(value: Any, path: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            if value.is_sparse or value.layout != torch.strided:
                raise TypeError(f"cannot checkpoint non-strided tensor at {'.'.join(path)!r}")
            name = name_for(path)
            tensors[name] = snapshot_tensor(value, reuse.get(name))
            return {_TENSOR: name}
        if isinstance(value, np.ndarray):
            name = name_for(path)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
            return {_NDARRAY: name}
        if isinstance(value, np.generic):
            return {_NPSCALAR: [value.dtype.str, value.item()]}
        if isinstance(value, _JSON_SCALARS):
            return value
        if isinstance(value, (tuple, list)) and all(type(v) in _PLAIN_SCALARS for v in value):
            # The RNG states are long runs of plain ints (625 for Python's, 624 for NumPy's, per
            # rank): encoded as they are, with no per-number path, the same skeleton costs a tenth.
            return {_TUPLE: list(value)} if isinstance(value, tuple) else list(value)
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, path + [str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, path + [str(i)]) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            metadata = getattr(value, "_metadata", None)
            plain = all(isinstance(k, str) for k in value) and not (_MARKERS & set(value)) and metadata is None
            if plain:
                return {k: encode(v, path + [k]) for k, v in value.items()}
            pairs = [[encode(k, path + ["key"]), encode(v, path + [str(k)])] for k, v in value.items()]
            out: dict[str, Any] = {_DICT: pairs}
            if metadata is not None:
                out[_META] = encode(dict(metadata), path + ["_metadata"])
            return out
        raise TypeError(
            f"cannot checkpoint {type(value).__name__} at {'.'.join(path) or '<root>'!r}: "
            "state must be tensors, arrays, numbers, strings, None, lists, tuples and dicts"
        )

    skeleton = encode(obj, [])
    return tensors, skeleton


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild what :func:`flatten_state` split. Raises ``KeyError`` for a missing tensor."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if _TENSOR in value and len(value) == 1:
            return tensors[value[_TENSOR]]
        if _NDARRAY in value and len(value) == 1:
            return tensors[value[_NDARRAY]].numpy().copy()
        if _NPSCALAR in value and len(value) == 1:
            dtype, item = value[_NPSCALAR]
            return np.dtype(dtype).type(item)
        if _TUPLE in value and len(value) == 1:
            return tuple(decode(v) for v in value[_TUPLE])
        if _DICT in value and set(value) <= {_DICT, _META}:
            out = OrderedDict((_hashable(decode(k)), decode(v)) for k, v in value[_DICT])
            if _META in value:
                out._metadata = decode(value[_META])  # type: ignore[attr-defined]
                return out
            return dict(out)
        return {k: decode(v) for k, v in value.items()}

    return decode(skeleton)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key
