"""Memory preflight: the estimator's arithmetic, the refusal through the real CLI (before any
weight is read), ``+preflight=true`` and the refusal of a quantised base where it cannot run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from hydra import compose, initialize_config_dir

from so8t.config import CONF_DIR, register
from so8t.config.validate import validate
from so8t.errors import SetupError
from so8t.model.memory import GIB, estimate
from so8t.preflight import check_memory, fitting_knobs, shapes_for

register()


def phi3_config_dir(folder: Path, **sizes) -> Path:
    """A folder with only a config.json of a Phi-3 model: no weights to load at all."""
    params = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32)
    params.update(sizes)
    transformers.Phi3Config(**params, max_position_embeddings=4096, original_max_position_embeddings=4096,
                            pad_token_id=32000, eos_token_id=32000, bos_token_id=1,
                            tie_word_embeddings=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def phi35_dir(tmp_path_factory):
    return phi3_config_dir(tmp_path_factory.mktemp("phi35"))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return phi3_config_dir(tmp_path_factory.mktemp("phi3-small"), hidden_size=256, intermediate_size=768,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("train", overrides=list(overrides)))


def run_cli(cwd: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "so8t.train", "output.progress_bars=false", *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_phi35_preset_fits_12_gib_in_bf16_and_nf4_fits_twice_the_rollout(phi35_dir):
    cfg = _cfg("experiment=phi35_rtx3060", "model=local", f"model.path={phi35_dir}")
    model, run = shapes_for(cfg, cuda=True)
    assert (model.num_layers, model.hidden, model.vocab) == (32, 3072, 32064)
    assert 3.7e9 < model.params_total < 3.9e9
    assert run.first_adapted == 24 and run.dtype_bytes == 2
    bf16 = estimate(model, run)
    assert 7.0 * GIB < bf16.resident["weights"] < 7.2 * GIB  # 3.82 B parameters x 2 bytes
    assert bf16.peak_total <= 12 * GIB
    nf4 = estimate(model, dataclasses.replace(run, quantization="nf4", rollout_batch=2 * run.rollout_batch,
                                              rollout_chunk=2 * run.rollout_chunk))
    assert nf4.resident["weights"] < 0.4 * bf16.resident["weights"]
    assert nf4.peak_total <= 12 * GIB


def test_each_knob_shrinks_the_phase_it_claims_to(small_dir):
    cfg = _cfg("model=local", f"model.path={small_dir}", "ppo.rollout_batch_size=32", "ppo.max_new_tokens=64",
               "adapter.layers=null")
    model, run = shapes_for(cfg, cuda=False)
    base = estimate(model, run)
    chunked = estimate(model, dataclasses.replace(run, rollout_chunk=4))
    assert chunked.phases["reference"] < base.phases["reference"] / 4
    assert chunked.phases["sampling"] < base.phases["sampling"]
    checkpointed = estimate(model, dataclasses.replace(run, gradient_checkpointing=True))
    assert checkpointed.phases["ppo forward + backward"] < base.phases["ppo forward + backward"]
    # Adapters only on the last layer: the frozen layers below save no activations.
    top_only = estimate(model, dataclasses.replace(run, first_adapted=3))
    assert top_only.phases["ppo forward + backward"] < base.phases["ppo forward + backward"]
    knobs = fitting_knobs(model, run, int(base.peak_total * 0.6), mini_batch=8)
    assert knobs and knobs[0].startswith("hardware.rollout_micro_batch_size=")


@pytest.mark.parametrize("overrides,states", [
    ([], 2),  # AdamW's two moments
    (["ppo/optimizer=sgd"], 0),
    (["ppo/optimizer=sgd", "ppo.optimizer.momentum=0.9"], 1),
    (["ppo/optimizer=adam"], 2),
])
def test_the_optimizer_state_is_counted_for_the_chosen_class(small_dir, overrides, states):
    cfg = _cfg("model=local", f"model.path={small_dir}", *overrides)
    model, run = shapes_for(cfg, cuda=False)
    assert run.optimizer_states == states
    # The parameters, their gradients and the state, fp32 each.
    assert estimate(model, run).resident["trainable + grads + optimizer"] == run.trainable_params * 4 * (2 + states)


def test_check_memory_warns_or_refuses_by_memory_check(small_dir, caplog):
    over = ["model=local", f"model.path={small_dir}", "hardware.memory_budget_gb=0.01"]
    with pytest.raises(SetupError, match="exceeds hardware.memory_budget_gb=0.01"):
        check_memory(_cfg(*over), "cpu")
    assert check_memory(_cfg(*over, "hardware.memory_check=warn"), "cpu") is not None
    assert "exceeds" in caplog.text
    assert check_memory(_cfg(*over, "hardware.memory_check=off"), "cpu") is None
    assert check_memory(_cfg("model=local", f"model.path={small_dir}"), "cpu") is None  # no budget


def test_an_over_budget_config_is_refused_before_loading_with_the_knob(small_dir, tmp_path):
    # The model folder holds a config.json and nothing else: any attempt to load weights would fail
    # with another message, so the refusal proves the check ran first.
    started = time.monotonic()
    proc = run_cli(tmp_path, "model=local", f"model.path={small_dir}", "ppo.rollout_batch_size=32",
                   "ppo.max_new_tokens=64", "hardware.memory_budget_gb=0.5")
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "exceeds hardware.memory_budget_gb=0.5" in out
    assert "hardware.rollout_micro_batch_size=" in out and "phase     reference" in out
    assert "Traceback" not in out
    assert seconds < 60  # a guard against loading anything large, not a speed target


def test_preflight_prints_the_table_and_exits_0(phi35_dir, tmp_path):
    proc = run_cli(tmp_path, "experiment=phi35_rtx3060", "model=local", f"model.path={phi35_dir}",
                   "+preflight=true")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for text in ("resident  weights", "phase     sampling", "phase     reference", "phase     ppo forward + backward",
                 "CUDA context", "estimated peak", "fits:"):
        assert text in proc.stdout, text
    proc = run_cli(tmp_path, "experiment=phi35_rtx3060", "model=local", f"model.path={phi35_dir}",
                   "hardware.memory_budget_gb=6", "+preflight=true")
    assert proc.returncode == 0 and "does NOT fit" in proc.stdout
    assert "model.quantization=nf4" in proc.stdout


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_without_cuda_is_refused_clearly(kind, tmp_path):
    proc = run_cli(tmp_path, f"model.quantization={kind}", "max_steps=1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"model.quantization={kind} needs a CUDA device" in out and "Traceback" not in out


def test_bad_new_keys_are_refused_naming_the_key(tmp_path):
    # A value outside a choice is refused while Hydra composes (exit 2, as an unknown key) ...
    for override, choices in (("model.quantization=fp8", "[none, nf4, int8]"),
                              ("hardware.memory_check=maybe", "[error, warn, off]")):
        proc = run_cli(tmp_path, override)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and override.split("=")[0] in out and f"expected one of {choices}" in out, out
    # ... a value outside a range by validation (exit 2).
    proc = run_cli(tmp_path, "hardware.rollout_micro_batch_size=0")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "hardware.rollout_micro_batch_size=0 must be > 0" in out, out
