"""A Phi-3.5-mini-instruct look-alike small enough for CPU tests, saved like a downloaded model.

Phi-3 architecture, Phi-3.5's chat template and special tokens (``<|system|>``, ``<|user|>``,
``<|assistant|>``, ``<|end|>``), three stop ids in ``generation_config.json``, and, as the
real tokenizer, a pad token equal to EOS (``<|endoftext|>``), which SO8T must replace.

The first two decoder layers are the shipped tiny instruct model's, so the model answers
arithmetic chat turns and ends them with ``<|end|>``; the others add nothing to the residual
stream (zero output projections), so the model has the layer count the Phi-3.5 presets
adapt (their last eight) and still behaves like the tiny model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from so8t.model.tiny import TINY_DIR


def make_phi35_style_model(folder: Path, num_layers: int = 8, dtype: torch.dtype = torch.bfloat16) -> Path:
    tiny = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
    config = tiny.config
    config.num_hidden_layers = num_layers
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    state = model.state_dict()
    state.update(tiny.state_dict())  # embeddings, the first two layers, the final norm, lm_head
    model.load_state_dict(state)
    with torch.no_grad():
        for layer in model.model.layers[tiny.config.num_hidden_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.generation_config = tiny.generation_config
    model.to(dtype).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    tokenizer.pad_token = tokenizer.eos_token  # as Phi-3.5's tokenizer: pad == <|endoftext|>
    tokenizer.save_pretrained(folder)
    return folder
