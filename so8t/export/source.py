"""What ``so8t-export`` exports from: a run's ``final/`` or a committed checkpoint.

SOURCE may be

* a run folder: its ``final/`` (the policy at the end of the run);
* a ``final/`` folder itself;
* a checkpoint folder (``checkpoints/step_…``), verified against its manifest before use;
* a run's ``checkpoints/`` folder: the checkpoint named by ``LATEST``.

A checkpoint carries everything needed to rebuild the policy: the trainable weights, the gate
schedule and step, and in its manifest the config identity, which holds the ``model.*`` and
``adapter.*`` keys the run was built from. The policy is rebuilt exactly as the run built it
(same base loading, same adapters) and the gate is the schedule's value at the checkpoint's
step, which is what the run writes to ``final/`` when it ends at that step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from so8t.config.identity import upgrade_identity, upgrade_section
from so8t.export.errors import ExportError

log = logging.getLogger(__name__)

FINAL_DIR = "final"
# Written into every export (see so8t.export.layout); an export is not a source.
EXPORT_META_FILE = "so8t_export.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class TrainedPolicy:
    """A policy rebuilt from a run, with what the model card says about it."""

    policy: Any  # so8t.model.policy.PolicyWithValue, fp32, adapters active
    tokenizer: Any
    model_cfg: dict
    adapter_cfg: dict
    gate: float | None
    step: int | None
    source: Path  # the final/ or checkpoint folder actually read
    source_kind: str  # "final" or "checkpoint"
    run_dir: Path | None  # the run folder it belongs to, when it sits in one
    stop_ids: list[int]  # every token id that ended a response in training
    prompting: dict  # chat_template / system_prompt / instruction of the run's prompts


def resolve_source(path: str | Path) -> tuple[str, Path]:
    """``("final" | "checkpoint", folder)`` for SOURCE; ExportError if it is neither."""
    from so8t.checkpoint.store import LATEST_FILE, MANIFEST_FILE, CheckpointStore, parse_step
    from so8t.final_policy import POLICY_FILE

    path = Path(path)
    if not path.exists():
        raise ExportError(f"SOURCE {path} does not exist")
    if not path.is_dir():
        raise ExportError(f"SOURCE {path} is a file; give a run folder, its final/ or a checkpoint folder")
    if (path / POLICY_FILE).is_file():
        return "final", path
    if (path / MANIFEST_FILE).exists() or parse_step(path.name) is not None:
        return "checkpoint", path
    if (path / FINAL_DIR / POLICY_FILE).is_file():
        return "final", path / FINAL_DIR
    for root in (path, path / CHECKPOINTS_DIR):
        if (root / LATEST_FILE).is_file():
            store = CheckpointStore(root)
            latest = store.read_latest()
            if latest is None or not (root / latest).is_dir():
                raise ExportError(f"{root / LATEST_FILE} does not name a checkpoint folder; "
                                  "give the checkpoint folder (step_…) itself")
            if root == path / CHECKPOINTS_DIR:
                raise ExportError(
                    f"run folder {path} has no {FINAL_DIR}/ (the run has not finished); export a "
                    f"checkpoint instead, e.g. {root / latest}"
                )
            return "checkpoint", root / latest
    if (path / EXPORT_META_FILE).is_file():
        raise ExportError(f"SOURCE {path} is already an export; give the run folder it came from")
    raise ExportError(
        f"SOURCE {path} is not a run folder, a {FINAL_DIR}/ folder or a checkpoint: it holds neither "
        f"{FINAL_DIR}/{POLICY_FILE}, {POLICY_FILE}, {MANIFEST_FILE} nor {CHECKPOINTS_DIR}/{LATEST_FILE}"
    )


def load_trained_policy(path: str | Path, device: str = "cpu") -> TrainedPolicy:
    """Rebuild the policy that SOURCE describes, in fp32 (the fold is done in full precision)."""
    kind, folder = resolve_source(path)
    if kind == "final":
        return _from_final(folder, device)
    return _from_checkpoint(folder, device)


def _from_final(folder: Path, device: str) -> TrainedPolicy:
    from so8t.final_policy import POLICY_FILE, load_policy

    try:
        meta = json.loads((folder / POLICY_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) \
                or not isinstance(meta.get("adapter"), dict):
            raise ValueError("it lacks the 'model' and 'adapter' sections")
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder / POLICY_FILE} is not a readable SO8T policy file: {exc}") from exc
    loaded = _rebuild(lambda: load_policy(folder, device=device, dtype="float32"), folder)
    step = meta.get("step")
    _warn_if_checkpoints_are_newer(folder, step)
    return TrainedPolicy(
        policy=loaded.policy, tokenizer=loaded.tokenizer, model_cfg=upgrade_section("model", meta["model"]),
        adapter_cfg=meta["adapter"],
        gate=meta.get("gate"), step=step if isinstance(step, int) else None, source=folder,
        source_kind="final", run_dir=folder.parent if folder.name == FINAL_DIR else None,
        stop_ids=list(loaded.stop_ids), prompting=dict(loaded.prompting),
    )


def _from_checkpoint(folder: Path, device: str) -> TrainedPolicy:
    from omegaconf import OmegaConf

    from so8t.build import build_policy_and_tokenizer
    from so8t.checkpoint import CheckpointError, CheckpointStore, unflatten_state
    from so8t.model.gate import GateSchedule

    store = CheckpointStore(folder.parent)
    problems = store.verify(folder)
    if problems:
        raise ExportError(f"checkpoint {folder} is not usable: {'; '.join(problems)}")
    try:
        tensors, skeleton, manifest = store.load(folder)
        parts = unflatten_state(skeleton, tensors)["parts"]
        weights, step = parts["weights"], int(parts["counters"]["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"checkpoint {folder} does not hold a SO8T training state: {exc!r}") from exc
    identity = manifest.get("config_identity")
    if isinstance(identity, dict):
        identity = upgrade_identity(identity)
    model_cfg, adapter_cfg = _section(identity, "model"), _section(identity, "adapter")
    if not model_cfg or not adapter_cfg:
        raise ExportError(f"checkpoint {folder}: its manifest has no model/adapter config identity")

    def build():
        policy, tokenizer = build_policy_and_tokenizer(
            OmegaConf.create(model_cfg), OmegaConf.create(adapter_cfg), torch.device(device), torch.float32
        )
        policy.load_trainable_state_dict({k: v.to(device) for k, v in weights.items()})
        return policy, tokenizer

    policy, tokenizer = _rebuild(build, folder)
    gate = None
    if "gate_schedule" in parts:
        schedule = GateSchedule()
        schedule.load_state_dict(parts["gate_schedule"])
        gate = schedule.value(step)  # what the run's final/ export records at this step
        policy.set_gate(gate)
    policy.eval()
    run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else None
    from so8t.model.stops import stop_token_ids

    data = _section(identity, "data")
    return TrainedPolicy(
        policy=policy, tokenizer=tokenizer, model_cfg=model_cfg, adapter_cfg=adapter_cfg, gate=gate,
        step=step, source=folder, source_kind="checkpoint", run_dir=run_dir,
        stop_ids=stop_token_ids(policy.base, tokenizer, identity.get("ppo.stop_token_ids")),
        prompting={key: data.get(key) for key in ("chat_template", "system_prompt", "instruction")},
    )


def _warn_if_checkpoints_are_newer(final: Path, step: Any) -> None:
    """A run resumed with a larger max_steps and stopped early keeps its older final/."""
    from so8t.checkpoint.store import CheckpointStore, parse_step

    if final.name != FINAL_DIR or not isinstance(step, int):
        return
    latest = CheckpointStore(final.parent / CHECKPOINTS_DIR).read_latest()
    if latest is not None and parse_step(latest) > step:
        log.warning("%s holds the policy at step %d, but the run's newest checkpoint is %s; export "
                    "that checkpoint for the later policy", final, step, final.parent / CHECKPOINTS_DIR / latest)


def _rebuild(build, folder: Path):
    """Run ``build()``, turning the ways a source can fail to load into ExportError."""
    from so8t.errors import ModelNotAvailableError, SetupError

    try:
        return build()
    except (ModelNotAvailableError, SetupError) as exc:
        raise ExportError(f"cannot load the base model of {folder}: {exc}") from exc
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        # safetensors reports a damaged file as OSError/SafetensorError (a RuntimeError
        # subclass is not guaranteed), a state that does not fit the model as KeyError.
        raise ExportError(f"cannot rebuild the policy from {folder}: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise ExportError(f"cannot rebuild the policy from {folder}: a damaged safetensors file ({exc})") from exc
        raise


def _section(identity: Any, prefix: str) -> dict:
    """The nested config section ``prefix`` from the flat ``{"a.b.c": value}`` identity."""
    if not isinstance(identity, dict):
        return {}
    section: dict = {}
    for key, value in identity.items():
        if not key.startswith(prefix + "."):
            continue
        node = section
        *parents, leaf = key[len(prefix) + 1:].split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return section
