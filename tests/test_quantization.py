"""The quantised-base option: where it is refused, and what reaches ``from_pretrained``.

bitsandbytes kernels need CUDA, so a real NF4 load cannot run here; these tests pin the two
refusals a user meets without one (no CUDA, no bitsandbytes) and the exact loading request a
CUDA machine would send (``benchmarks/gpu_check.py`` runs the real load on a GPU).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from so8t.errors import SetupError
from so8t.model import loading
from so8t.model.quantization import check_quantization, quantization_config


def _bitsandbytes_installed(monkeypatch, installed: bool) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "bitsandbytes":
            return SimpleNamespace(name=name) if installed else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_missing_bitsandbytes_is_refused_with_the_install_line(monkeypatch, kind):
    _bitsandbytes_installed(monkeypatch, False)
    with pytest.raises(SetupError) as err:
        check_quantization(kind, torch.device("cuda", 0))
    message = str(err.value)
    assert f"model.quantization={kind} needs bitsandbytes" in message
    assert 'pip install -e ".[quant]"' in message and "model.quantization=none" in message


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "mps"])
def test_quantisation_off_cuda_is_refused_before_bitsandbytes_is_looked_for(monkeypatch, device):
    _bitsandbytes_installed(monkeypatch, True)
    with pytest.raises(SetupError, match="needs a CUDA device"):
        check_quantization("nf4", device)


def test_cuda_with_bitsandbytes_is_accepted_and_none_is_accepted_anywhere(monkeypatch):
    _bitsandbytes_installed(monkeypatch, True)
    check_quantization("nf4", "cuda:1")
    check_quantization("int8", torch.device("cuda"))
    _bitsandbytes_installed(monkeypatch, False)
    check_quantization("none", "cpu")


def test_nf4_and_int8_configs_are_the_documented_ones():
    nf4 = quantization_config("nf4", torch.bfloat16)
    assert isinstance(nf4, BitsAndBytesConfig)
    assert (nf4.load_in_4bit, nf4.load_in_8bit) == (True, False)
    assert nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    int8 = quantization_config("int8", torch.float16)
    assert (int8.load_in_4bit, int8.load_in_8bit) == (False, True)
    assert quantization_config("none", torch.float32) is None


def test_a_quantised_load_asks_transformers_for_a_quantised_read_straight_onto_the_device(monkeypatch):
    """What ``load_base_model`` hands ``from_pretrained`` for ``model.quantization=nf4`` on CUDA.

    The request is captured and then served without quantisation on the CPU (bitsandbytes
    cannot run here), so the rest of the load (pad token, freezing) runs for real."""
    _bitsandbytes_installed(monkeypatch, True)
    requests = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, name, **kwargs):
        requests.append(kwargs)
        kwargs = dict(kwargs, quantization_config=None, device_map=None)
        return real(cls, name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    cfg = SimpleNamespace(kind="tiny", path=None, quantization="nf4", attn_implementation="eager")
    model, _ = loading.load_base_model(cfg, dtype=torch.bfloat16, device="cuda:0")

    (request,) = requests
    assert request["device_map"] == {"": torch.device("cuda", 0)}
    assert request["dtype"] == torch.bfloat16 and request["attn_implementation"] == "eager"
    assert isinstance(request["quantization_config"], BitsAndBytesConfig)
    assert request["quantization_config"].load_in_4bit
    # A quantised model must not be moved or cast afterwards (bitsandbytes forbids .to(dtype)).
    assert next(model.parameters()).device.type == "cpu"
    assert not any(p.requires_grad for p in model.parameters())
