"""A run's ``final/`` folder: ``save_final`` writes it, ``so8t.load_policy`` rebuilds a policy
from it (or from a folder written by ``so8t-export``) for inference.

It sits above ``so8t.model`` because it joins the model with what the run recorded around it:
the config it was built from (so8t.build), the atomic folder write and manifest (so8t.run), and
sampling with the run's stops (so8t.ppo.rollout).

``final/`` holds only what training produced (adapter and value head, in safetensors), the
tokenizer, and ``policy.json`` naming the base model and the adapter config; the frozen base
is loaded from where the run loaded it (the shipped tiny model, the hub cache or a folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from so8t.config.identity import upgrade_section
from so8t.run.atomic import write_dir_atomically
from so8t.run.folder_manifest import write_manifest

log = logging.getLogger(__name__)

POLICY_FILE = "policy.json"
ADAPTER_FILE = "adapter.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"


def save_final(policy, tokenizer, model_cfg: dict, adapter_cfg: dict, gate: float | None, out_dir: Path,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the trained policy to ``out_dir``, replaced as a whole (written aside, then renamed,
    so a crash leaves either the old folder or the new one, never a mix)."""
    def write(tmp: Path) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in policy.trainable_state_dict().items()}
        save_file({k: v for k, v in state.items() if not k.startswith("value_head.")}, str(tmp / ADAPTER_FILE))
        save_file({k: v for k, v in state.items() if k.startswith("value_head.")}, str(tmp / VALUE_HEAD_FILE))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": 1, "model": model_cfg, "adapter": adapter_cfg, "gate": gate, **(extra or {})}
        (tmp / POLICY_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        # Every file hashed into MANIFEST.json: so8t-train verifies final/ before calling a run done.
        write_manifest(tmp)

    write_dir_atomically(Path(out_dir), write)
    log.info("final policy written to %s", out_dir)
    return Path(out_dir)


class LoadedPolicy:
    """A policy rebuilt from ``final/``: the HF model with adapters inside, plus its tokenizer."""

    def __init__(self, policy, tokenizer, device: torch.device, stop_ids: list[int],
                 prompting: dict[str, Any] | None = None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.device = device
        self.stop_ids = list(stop_ids)
        # chat_template / system_prompt / instruction of the run's data config.
        self.prompting = dict(prompting or {})

    @property
    def model(self):
        """The Hugging Face causal LM with the adapters active inside its forward pass."""
        return self.policy.base

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, temperature: float = 1.0,
                 greedy: bool = True) -> list[str]:
        """Answer each user text as in training: the same chat template, system prompt and
        instruction around it, the same stop tokens; special tokens are left out of the answer."""
        from so8t.data.prompts import render_user_prompts
        from so8t.ppo.rollout import sample_responses

        rendered = render_user_prompts(prompts, self.tokenizer, **self.prompting)
        enc = self.tokenizer.pad({"input_ids": [list(p.input_ids) for p in rendered]}, return_tensors="pt")
        out = sample_responses(self.policy, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
                               max_new_tokens, temperature, self.stop_ids, self.tokenizer.pad_token_id, greedy=greedy)
        texts = []
        for ids, mask in zip(out.response_ids.tolist(), out.response_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m]
            if kept and kept[-1] in self.stop_ids:
                kept = kept[:-1]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        return texts


def load_policy(path: str | Path, device: str = "cpu", dtype: str = "float32", *,
                trust_remote_code: bool = False, local_files_only: bool = True) -> LoadedPolicy:
    """Rebuild the trained policy saved in ``path`` (a run's ``final/`` folder, or a folder
    written by ``so8t-export``).

    ``policy.json`` is a file anyone who can write the folder can edit, so the settings that
    would run code or fetch files from elsewhere come from the caller, never from it:
    ``trust_remote_code`` (run the model repository's own Python code) and
    ``local_files_only=False`` (download the base model from the hub)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from so8t.build import DTYPES, build_policy_and_tokenizer
    from so8t.export.loading import is_export_dir, load_export

    path = Path(path)
    if is_export_dir(path):
        return load_export(path, device=device, dtype=dtype)
    meta_file = path / POLICY_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a SO8T policy export: {POLICY_FILE} is missing")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    model_cfg = upgrade_section("model", meta["model"])  # a policy.json written under older key names
    for key, allowed in (("trust_remote_code", trust_remote_code), ("local_files_only", local_files_only)):
        if key in model_cfg and model_cfg[key] != allowed:
            log.warning("%s sets model.%s=%s; using %s=%s as the caller asked", meta_file, key, model_cfg[key],
                        key, allowed)
        model_cfg[key] = allowed
    torch_device = torch.device(device)
    policy, _ = build_policy_and_tokenizer(OmegaConf.create(model_cfg), OmegaConf.create(meta["adapter"]),
                                           torch_device, DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    state = load_file(str(path / ADAPTER_FILE))
    state.update(load_file(str(path / VALUE_HEAD_FILE)))
    policy.load_trainable_state_dict({k: v.to(torch_device) for k, v in state.items()})
    if meta.get("gate") is not None:
        policy.set_gate(meta["gate"])
    policy.eval()
    from so8t.model.stops import stop_token_ids

    stop_ids = meta.get("stop_token_ids") or stop_token_ids(policy.base, tokenizer)
    return LoadedPolicy(policy, tokenizer, torch_device, stop_ids, meta.get("prompting"))
