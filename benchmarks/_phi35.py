"""Phi-3.5-shaped models and a Phi-3.5-style tokenizer, built in code (no download).

Used by the benchmarks that need a full 32064-row vocabulary: ``memory_estimate.py``,
``ppo_throughput.py --configs phi3`` and ``gpu_check.py``. Needs only torch, transformers and
tokenizers.

The published Phi-3.5-mini-instruct numbers: hidden 3072, 32 layers, 32 attention heads (no
grouped KV), intermediate 8192, 32064 embedding rows (32000 SentencePiece pieces + 11 added
chat tokens, padded to a multiple of 64), RMSNorm eps 1e-5, rope theta 10000, 4096 original
positions, untied lm_head.

The tokenizer has the same ids for the same special tokens (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<|endoftext|>`` 32000, ``<|assistant|>`` 32001, ``<|system|>`` 32006, ``<|end|>`` 32007,
``<|user|>`` 32010), ``<|endoftext|>`` as both EOS and pad (as shipped, so the loader adds a
distinct pad inside the spare embedding rows), and the same chat template. Its 32000 base
pieces are characters and filler tokens rather than SentencePiece merges: what matters for
memory and speed is the vocabulary's size, not which strings its pieces spell.
"""

from __future__ import annotations

import json
from pathlib import Path

PHI35_MINI = dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=8192, vocab_size=32064)

ADDED_TOKENS = {
    "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
TAGS = ("<think>", "</think>", "<final>", "</final>")
BASE_PIECES = 32000


def build_phi35_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab_list = ["<unk>", "<s>", "</s>", *TAGS, *chars]
    vocab_list += [f"<|piece{i}|>" for i in range(BASE_PIECES - len(vocab_list))]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    vocab.update(ADDED_TOKENS)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    specials = sorted(ADDED_TOKENS, key=ADDED_TOKENS.get)
    pattern = "|".join(t.replace("|", "\\|").replace("/", "\\/") for t in (*TAGS, *specials)) + "|.|\\n"
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(["<unk>", "<s>", "</s>", *specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def phi35_config(**overrides):
    """A Phi-3.5-mini config, with any size overridden (e.g. ``num_hidden_layers=2``)."""
    from transformers import Phi3Config

    sizes = {**PHI35_MINI, **overrides}
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]  # Phi-3.5 has no grouped KV
    return Phi3Config(
        **sizes, max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="silu",
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False,
        architectures=["Phi3ForCausalLM"],
    )


def build_model_dir(folder: Path, seed: int = 0, dtype=None, device="cpu", never_stop: bool = True,
                    **sizes) -> Path:
    """Random-init Phi-3.5-shaped model + tokenizer saved to ``folder`` (``save_pretrained``).

    ``never_stop``: the ``lm_head`` rows of every special token get a large negative weight on a
    channel that the embeddings hold at 1, so sampling never stops early and every response has
    the full length (equal work across the sides of a comparison). Built with ``device`` and
    ``dtype`` directly (a 3.8 B model built on a GPU in bf16 takes seconds, in fp32 on CPU minutes).
    """
    import torch
    from transformers import Phi3ForCausalLM

    folder = Path(folder)
    config = phi35_config(**sizes)
    tokenizer = build_phi35_tokenizer()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    # Parameters created in ``dtype`` directly: a 3.8 B model built in fp32 first needs 15 GB.
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if never_stop:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] = 1.0
            for token_id in (0, 1, 2, *ADDED_TOKENS.values(), *range(32011, config.vocab_size)):
                model.lm_head.weight[token_id, 0] = -5.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation = {"eos_token_id": [32007, 32001, 32000], "bos_token_id": 1, "pad_token_id": 32000}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def write_prompts(path: Path, count: int = 256, seed: int = 1234, chars: int | None = None) -> int:
    """``count`` JSON-lines prompts ``a+b=`` (two-digit operands; all of one length, padded with
    spaces to ``chars`` characters when given). Returns their length in tokens (one per character)."""
    import random

    rng = random.Random(seed)
    length = 0
    with open(path, "w") as fh:
        for _ in range(count):
            text = f"{rng.randint(10, 99)}+{rng.randint(10, 99)}="
            if chars is not None:
                text = " " * (chars - len(text)) + text
            length = len(text)
            fh.write(json.dumps({"prompt": text}) + "\n")
    return length
