"""``so8t-export`` end to end: real training runs and the real export command in subprocesses,
the exported folders loaded by plain transformers / PEFT in a *fresh* process, compared with
the adapted policy SO8T rebuilds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import so8t
from so8t.build import build_policy_and_tokenizer
from so8t.final_policy import save_final
from so8t.model.tiny import TINY_DIR, build_tiny_tokenizer

pytestmark = pytest.mark.slow

SO8_RUN = ("adapter.layers=[0,-1]", "adapter.init_std=0.05")
PROMPTS = ["3+4=", "12+9=", "7+15="]
MAX_NEW = 10

# Loads an export with nothing but transformers (and PEFT for an adapter folder) and writes
# its logits and greedy generations: run in a fresh interpreter, so no SO8T hook or state
# of the test process can leak into what is measured.
FRESH = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
spec = json.load(open(sys.argv[1]))
if spec.get("peft_base"):
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["peft_base"]), spec["dir"])
else:
    model = AutoModelForCausalLM.from_pretrained(spec["dir"])
model.eval()
ids, mask = torch.tensor(spec["ids"]), torch.tensor(spec["mask"])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits
    generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=spec["max_new"])
save_file({"logits": logits.contiguous()}, spec["out"] + ".safetensors")
json.dump({"generated": generated.tolist(), "class": type(model).__name__, "dtype": str(model.dtype),
           "hooks": sum(len(m._forward_hooks) for m in model.modules())}, open(spec["out"] + ".json", "w"))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def train(cwd: Path, *overrides: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "so8t.train", "output.progress_bars=false", *overrides],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (cwd / "outputs" / "default" / "runs").iterdir()
    return run_dir


def export(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "so8t.export", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def fresh_outputs(tmp: Path, export_dir: Path, ids, mask, peft_base: Path | None = None) -> tuple[torch.Tensor, dict]:
    spec = {"dir": str(export_dir), "ids": ids.tolist(), "mask": mask.tolist(), "max_new": MAX_NEW,
            "out": str(tmp / f"fresh-{export_dir.name}"), "peft_base": str(peft_base) if peft_base else None}
    spec_file = tmp / f"spec-{export_dir.name}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", FRESH, str(spec_file)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(spec["out"] + ".safetensors")["logits"], json.loads(Path(spec["out"] + ".json").read_text())


def reference_outputs(model, ids, mask) -> tuple[torch.Tensor, list]:
    """Logits and greedy generations of the adapted policy (its HF model, adapters inside)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)
    return logits, generated.tolist()


def encode(tokenizer, prompts=PROMPTS):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def so8_run(tmp_path_factory) -> Path:
    """The tiny model with SO(8) adapters after both layers (non-zero rotations), 2 updates."""
    return train(tmp_path_factory.mktemp("so8"), "max_steps=2", *SO8_RUN)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("lora"), "adapter=lora", "max_steps=2")


# --------------------------------------------------------------------- SO(8), merged exactly


def test_so8_run_merged_loads_in_plain_transformers_with_the_policys_logits_and_generations(so8_run, tmp_path):
    out = tmp_path / "my-model"
    proc = export(so8_run, "--merge", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "value_head.safetensors", "README.md", "so8t_export.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and "auto_map" not in config

    policy = so8t.load_policy(so8_run / "final")
    assert any(r.skew.abs().max() > 0 for r in policy.policy.adapter.rotations.values())
    ids, mask = encode(policy.tokenizer)
    ref_logits, ref_generated = reference_outputs(policy.model, ids, mask)
    logits, info = fresh_outputs(tmp_path, out, ids, mask)
    assert info["class"] == "Phi3ForCausalLM" and info["hooks"] == 0
    assert max_diff(logits, ref_logits, mask) <= 1e-4
    assert info["generated"] == ref_generated
    # The base model alone is measurably different: the comparison above can fail.
    base = so8t.load_policy(so8_run / "final")
    base.policy.adapter.remove()
    assert max_diff(base.model(input_ids=ids, attention_mask=mask).logits.detach(), ref_logits, mask) > 1e-3

    card = (out / "README.md").read_text()
    assert "so8t-train output.progress_bars=false max_steps=2 'adapter.layers=[0,-1]' adapter.init_std=0.05" in card
    assert "Reward (`reward/mean`) over 2 updates" in card and "Trained: 2 PPO updates" in card
    assert f"so8t-export {so8_run} --merge --out {out}" in card
    assert "init_std: 0.05" in card  # the resolved training config
    generation = json.loads((out / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(policy.stop_ids)  # every stop id of training
    assert generation["pad_token_id"] == policy.tokenizer.pad_token_id


def test_load_policy_reads_an_export_and_matches_final(so8_run, tmp_path):
    out = tmp_path / "exported"
    assert export(so8_run, "--out", out).returncode == 0  # SO(8) is merged without --merge too
    from_final, from_export = so8t.load_policy(so8_run / "final"), so8t.load_policy(out)
    assert from_export.policy.adapter is None
    ids, mask = encode(from_final.tokenizer)
    with torch.no_grad():
        a, b = from_final.policy(ids, mask), from_export.policy(ids, mask)
    assert max_diff(a.logits, b.logits, mask) <= 1e-4
    assert max_diff(a.values, b.values, mask) <= 1e-4  # the value head follows the merged basis
    assert from_final.generate(PROMPTS) == from_export.generate(PROMPTS)


def test_bf16_export_is_within_bf16_rounding_of_the_policy(so8_run, tmp_path):
    out = tmp_path / "bf16"
    assert export(so8_run, "--merge", "--dtype", "bfloat16", "--out", out).returncode == 0
    fp32 = so8t.load_policy(so8_run / "final")
    bf16_policy = so8t.load_policy(so8_run / "final", dtype="bfloat16")
    ids, mask = encode(fp32.tokenizer)
    ref, _ = reference_outputs(fp32.model, ids, mask)
    rounding = max_diff(reference_outputs(bf16_policy.model, ids, mask)[0].float(), ref, mask)
    logits, info = fresh_outputs(tmp_path, out, ids, mask)
    assert info["dtype"] == "torch.bfloat16"
    # The merged bf16 model errs no more than the adapted policy itself does when run in bf16.
    assert max_diff(logits.float(), ref, mask) <= 2 * rounding + 1e-3


def test_export_of_a_mid_run_checkpoint_equals_final_of_a_run_stopped_there(so8_run, tmp_path):
    longer = train(tmp_path, "max_steps=4", "checkpoint=step", "checkpoint.every_steps=2", *SO8_RUN)
    checkpoint = longer / "checkpoints" / "step_00000002"
    assert checkpoint.is_dir()
    from_checkpoint, from_final = tmp_path / "from-checkpoint", tmp_path / "from-final"
    assert export(checkpoint, "--out", from_checkpoint).returncode == 0
    assert export(so8_run, "--out", from_final).returncode == 0
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = tensors_of(from_checkpoint / name), tensors_of(from_final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    meta_a = json.loads((from_checkpoint / "so8t_export.json").read_text())
    meta_b = json.loads((from_final / "so8t_export.json").read_text())
    assert (meta_a["step"], meta_a["gate"], meta_a["source_kind"]) == (2, 1.0, "checkpoint")
    assert (meta_b["step"], meta_b["gate"], meta_b["source_kind"]) == (2, 1.0, "final")
    # The run's final/ (step 4) is a different policy: the equality above is not vacuous.
    at_end = tmp_path / "at-end"
    assert export(longer, "--out", at_end).returncode == 0
    end = tensors_of(at_end / "model.safetensors")
    assert not all(torch.equal(end[k], tensors_of(from_final / "model.safetensors")[k]) for k in end)
    card = (from_checkpoint / "README.md").read_text()
    assert "checkpoint `step_00000002`" in card and "over 2 updates" in card


# --------------------------------------------------------------------- Phi-3-shaped random model


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}={% endfor %}"


def _phi3_shaped_final(tmp: Path) -> tuple[Path, object]:
    """A random Phi-3 (fused qkv_proj / gate_up_proj, 4 layers, hidden 128) saved as a local
    model, with random non-zero rotations after layers 0, 2 and 3, gate 1, in a final/ folder."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                        tie_word_embeddings=False, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.3, 2.0)
    # Two stop ids (as Phi-3.5 has) and a chat template: both must reach the export.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</final>")]
    tokenizer.chat_template = CHAT_TEMPLATE
    base_dir = tmp / "phi3-base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model_cfg = {"kind": "local", "path": str(base_dir), "local_files_only": True, "trust_remote_code": False}
    adapter_cfg = {"kind": "so8", "layers": [0, 2, -1], "init_std": 0.3,
                   "gate": {"kind": "constant", "start": 1.0, "target": 1.0, "steps": 0, "steepness": 10.0}}
    policy, tokenizer = build_policy_and_tokenizer(OmegaConf.create(model_cfg), OmegaConf.create(adapter_cfg),
                                                   torch.device("cpu"), torch.float32)
    with torch.no_grad():
        policy.value_head.weight.normal_()
    final = save_final(policy, tokenizer, model_cfg, adapter_cfg, 1.0, tmp / "run" / "final", extra={"step": 7})
    return final, policy


def test_phi3_shaped_random_model_merged_equals_the_adapted_policy_in_a_fresh_process(tmp_path):
    final, policy = _phi3_shaped_final(tmp_path)
    out = tmp_path / "phi3-merged"
    proc = export(final, "--merge", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(3)
    ids = torch.randint(4, 20, (3, 14))
    mask = torch.ones_like(ids)
    ref_logits, ref_generated = reference_outputs(policy.base, ids, mask)
    logits, info = fresh_outputs(tmp_path, out, ids, mask)
    assert info["class"] == "Phi3ForCausalLM" and info["hooks"] == 0
    assert ref_logits.abs().max() > 1.0  # logits of order 1: the bound below is not vacuous
    assert max_diff(logits, ref_logits, mask) <= 1e-4
    assert info["generated"] == ref_generated
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    stop = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    tokenizer = build_tiny_tokenizer()
    assert stop == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</final>")]
    # The value head exported with the model reads the merged model's final hidden state.

    merged = AutoModelForCausalLM.from_pretrained(out)
    head = load_file(str(out / "value_head.safetensors"))
    with torch.no_grad():
        hidden = merged(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        values = hidden @ head["weight"].T + head["bias"]
        ref_values = policy(ids, mask).values
    assert (values.squeeze(-1) - ref_values).abs().max() <= 1e-4


# --------------------------------------------------------------------- LoRA


def test_lora_peft_export_loads_with_peft_and_equals_the_policy(lora_run, tmp_path):
    out = tmp_path / "lora-adapter"
    proc = export(lora_run, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    policy = so8t.load_policy(lora_run / "final")
    ids, mask = encode(policy.tokenizer)
    ref_logits, ref_generated = reference_outputs(policy.model, ids, mask)
    logits, info = fresh_outputs(tmp_path, out, ids, mask, peft_base=TINY_DIR)
    assert info["class"] == "PeftModelForCausalLM"
    assert max_diff(logits, ref_logits, mask) <= 1e-6
    assert info["generated"] == ref_generated
    with torch.no_grad():
        with policy.policy.reference():
            base_logits = policy.model(input_ids=ids, attention_mask=mask).logits
    assert max_diff(base_logits, ref_logits, mask) > 1e-4  # LoRA moved the policy after 2 updates
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    again = so8t.load_policy(out)
    with torch.no_grad():
        assert max_diff(again.policy(ids, mask).values, policy.policy(ids, mask).values, mask) <= 1e-6


def test_lora_merge_export_loads_in_plain_transformers_and_equals_the_policy(lora_run, tmp_path):
    out = tmp_path / "lora-merged"
    proc = export(lora_run, "--merge", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    policy = so8t.load_policy(lora_run / "final")
    ids, mask = encode(policy.tokenizer)
    ref_logits, ref_generated = reference_outputs(policy.model, ids, mask)
    logits, info = fresh_outputs(tmp_path, out, ids, mask)
    assert info["class"] == "Phi3ForCausalLM"
    assert max_diff(logits, ref_logits, mask) <= 1e-4
    assert info["generated"] == ref_generated


# --------------------------------------------------------------------- refusals (exit code 2)


def _tiny_final(tmp: Path, gate: float, name: str = "run") -> Path:
    model_cfg = {"kind": "tiny", "path": None, "local_files_only": True, "trust_remote_code": False}
    adapter_cfg = {"kind": "so8", "layers": None, "init_std": 0.1,
                   "gate": {"kind": "constant", "start": gate, "target": gate, "steps": 0, "steepness": 10.0}}
    policy, tokenizer = build_policy_and_tokenizer(OmegaConf.create(model_cfg), OmegaConf.create(adapter_cfg),
                                                   torch.device("cpu"), torch.float32)
    return save_final(policy, tokenizer, model_cfg, adapter_cfg, gate, tmp / name / "final", extra={"step": 1})


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def test_a_gate_below_one_is_refused_with_the_reason_and_nothing_is_written(tmp_path):
    final = _tiny_final(tmp_path, gate=0.5)
    out = tmp_path / "out"
    _refused(export(final.parent, "--merge", "--out", out), "gate of this policy is 0.5", "not a rotation")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left behind


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    tokenizer = build_tiny_tokenizer()
    model = GemmaForCausalLM(GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    model_cfg = {"kind": "local", "path": str(tmp_path / "gemma"), "local_files_only": True,
                 "trust_remote_code": False}
    adapter_cfg = {"kind": "so8", "layers": None, "init_std": 0.1,
                   "gate": {"kind": "constant", "start": 1.0, "target": 1.0, "steps": 0, "steepness": 10.0}}
    policy, tokenizer = build_policy_and_tokenizer(OmegaConf.create(model_cfg), OmegaConf.create(adapter_cfg),
                                                   torch.device("cpu"), torch.float32)
    final = save_final(policy, tokenizer, model_cfg, adapter_cfg, 1.0, tmp_path / "run" / "final")
    _refused(export(final, "--out", tmp_path / "out"), "GemmaForCausalLM", "Phi3ForCausalLM")
    assert not (tmp_path / "out").exists()


def test_bad_sources_and_outputs_are_refused_with_a_message(so8_run, tmp_path):
    _refused(export(tmp_path / "missing", "--out", tmp_path / "o"), "does not exist")
    (tmp_path / "empty").mkdir()
    _refused(export(tmp_path / "empty", "--out", tmp_path / "o"), "is not a run folder")
    _refused(export(so8_run, "--out", so8_run / "final" / "inside"), "overlaps the source")
    _refused(export(so8_run, "--format", "peft", "--out", tmp_path / "o"), "no PEFT adapter format")
    _refused(export(so8_run, "--merge", "--format", "peft", "--out", tmp_path / "o"), "contradict")
    # A damaged checkpoint is verified before use.
    import shutil

    broken_run = tmp_path / "broken"
    shutil.copytree(so8_run, broken_run)
    shutil.rmtree(broken_run / "final")
    _refused(export(broken_run, "--out", tmp_path / "o"), "has no final/", "step_00000002")
    tensors = broken_run / "checkpoints" / "step_00000002" / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    _refused(export(tensors.parent, "--out", tmp_path / "o"), "sha256 mismatch")
    assert not (tmp_path / "o").exists()


def test_an_existing_output_is_kept_unless_forced(so8_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(export(so8_run, "--out", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    proc = export(so8_run, "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone, no temporaries


def test_a_failed_write_leaves_no_output_and_no_temporary(so8_run, tmp_path, monkeypatch):
    import errno

    from so8t.export import ExportError, export_policy, exporter

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "_save_value_head", full_disk)
    with pytest.raises(ExportError, match="No space left on device"):
        export_policy(so8_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
