"""Export a trained policy as a standard Hugging Face artefact (``so8t-export``).

A run's ``final/`` (or any committed checkpoint) becomes a folder that tools outside SO8T
read: a PEFT adapter (LoRA runs), or a full model whose weights already contain the adapter
(LoRA merged with ``merge_and_unload``; SO(8) rotations folded in exactly, see
:mod:`so8t.export.fold`). Each export also carries the tokenizer, ``generation_config.json``
with the stop ids, the PPO value head (``value_head.safetensors``), a model card
(``README.md``) and ``so8t_export.json`` (what was exported, so ``so8t.load_policy`` can
load the folder again).

Modules: ``source`` (what to export from), ``fold`` (the exact SO(8) merge), ``exporter``
(the export itself), ``card`` (the README), ``atomic_dir`` (the output folder appears whole
or not at all), ``loading`` (export folder → policy), ``cli`` (the command).
"""

from so8t.export.errors import ExportError, FoldError

__all__ = ["ExportError", "FoldError", "export_policy", "load_export", "is_export_dir"]


def export_policy(*args, **kwargs):
    """See :func:`so8t.export.exporter.export_policy` (imported lazily: it needs torch)."""
    from so8t.export.exporter import export_policy as _export_policy

    return _export_policy(*args, **kwargs)


def load_export(*args, **kwargs):
    from so8t.export.loading import load_export as _load_export

    return _load_export(*args, **kwargs)


def is_export_dir(path) -> bool:
    from so8t.export.loading import is_export_dir as _is_export_dir

    return _is_export_dir(path)
