"""The embedded tiny model and tokenizer, and load_base_model for every source."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

from so8t.model.loading import ModelNotAvailableError, load_base_model
from so8t.model.pretrain_tiny import (
    PretrainSettings,
    chat_prompts,
    evaluate_greedy,
    pretrain,
    save_tiny,
)
from so8t.model.stops import stop_token_ids
from so8t.model.tiny import CHAT_TEMPLATE, TINY_DIR, build_tiny_config, build_tiny_tokenizer

SAMPLES = [
    "12+3=",
    "0+19=",
    "<think></think><final>12</final>",
    "7+8=<think></think><final>15</final><|end|>",
    "<s>1+1=<pad>",
    "<|system|>\nAnswer in the form <think>reasoning</think><final>the sum</final>.<|end|>\n<|user|>\n",
]


def model_cfg(kind: str, path: str | None = None, **kw) -> SimpleNamespace:
    return SimpleNamespace(
        kind=kind,
        path=path,
        local_files_only=kw.get("local_files_only", True),
        trust_remote_code=False,
    )


@pytest.fixture(scope="module")
def tiny():
    return load_base_model(model_cfg("tiny"))


# --- tokenizer ----------------------------------------------------------------------


def test_tokenizer_splits_digits_and_keeps_tags_and_words_whole():
    tok = build_tiny_tokenizer()
    ids = tok("12+3=").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "+", "3", "="]
    tags = tok("<think></think><final>12</final>").input_ids
    assert tok.convert_ids_to_tokens(tags) == [
        "<think>", "</think>", "<final>", "1", "2", "</final>"
    ]
    assert tok.unk_token_id not in tags
    words = tok("Add the two numbers: 3+4=").input_ids
    assert tok.convert_ids_to_tokens(words) == ["add", "the", "two", "numbers", ":", "3", "+", "4", "="]
    assert tok("hello").input_ids == [tok.unk_token_id]  # not a language model


def test_tokenizer_round_trip_and_special_tokens():
    tok = build_tiny_tokenizer()
    text = "<think></think><final>12</final>"
    assert tok.decode(tok(text).input_ids) == text
    # Nothing is added around the text, as with Phi-3.5's tokenizer.
    assert tok("1+2=").input_ids == tok("1+2=", add_special_tokens=False).input_ids
    ids = tok(text).input_ids + [tok.convert_tokens_to_ids("<|end|>"), tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags are not "special"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_tokenizer_is_an_instruct_tokenizer_in_the_phi35_mould():
    tok = build_tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    assert len({end, tok.eos_token_id, tok.pad_token_id}) == 3  # end of turn, end of text, pad
    text = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "1+2="}],
        tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\ns<|end|>\n<|user|>\n1+2=<|end|>\n<|assistant|>\n"
    assert tok.chat_template == CHAT_TEMPLATE


def test_shipped_tokenizer_and_generation_config_match_the_built_ones(tiny):
    built = build_tiny_tokenizer()
    shipped = AutoTokenizer.from_pretrained(TINY_DIR)
    assert shipped.get_vocab() == built.get_vocab()
    for text in SAMPLES:
        assert shipped(text).input_ids == built(text).input_ids, text
    assert shipped.chat_template == built.chat_template
    assert shipped.pad_token_id == built.pad_token_id != shipped.eos_token_id
    assert shipped.eos_token_id == built.eos_token_id
    assert shipped.padding_side == "left"
    batch = shipped(["1+2=", "12+13="], padding=True).input_ids
    assert batch[0][:2] == [shipped.pad_token_id] * 2  # left padding
    model, tok = tiny
    # Three stop ids, as Phi-3.5's generation_config.json: <|end|>, <|assistant|>, <|endoftext|>.
    names = ["<|end|>", "<|assistant|>", "<|endoftext|>"]
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(names)
    assert stop_token_ids(model, tok) == sorted(tok.convert_tokens_to_ids(names))


def test_stop_token_ids_union_and_errors(tiny):
    model, tok = tiny
    unk = tok.unk_token_id
    assert unk in stop_token_ids(model, tok, [unk])
    with pytest.raises(ValueError, match="pad token"):
        stop_token_ids(model, tok, [tok.pad_token_id])
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        stop_token_ids(model, tok, [10_000])


# --- tiny source ---------------------------------------------------------------------


def test_tiny_loads_frozen_with_distinct_left_pad(tiny):
    model, tok = tiny
    assert isinstance(model, Phi3ForCausalLM)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok) == build_tiny_config().vocab_size
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 150_000

    enc = tok(["1+2=", "12+13="], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_loads_in_requested_dtype():
    model, _ = load_base_model(model_cfg("tiny"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_shipped_model_is_partly_right(tiny):
    model, tok = tiny
    metrics = evaluate_greedy(model, tok, chat_prompts(tok, 9))
    assert metrics["well_formed"] >= 0.9
    # Mostly right, but with room for PPO to improve.
    assert 0.6 <= metrics["answer_accuracy"] <= 0.95, metrics
    # Against its system prompt it prefers the bare answer style the strict format reward
    # rejects: PPO has to teach the SO8T format.
    assert metrics["format_rate"] <= 0.5, metrics


@pytest.fixture
def one_thread():
    # The tiny model is far too small to gain from threads; on a busy machine two
    # threads contend and make the training run several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pretraining_stops_partly_right_and_saves_loadable_assets(tmp_path, one_thread):
    settings = PretrainSettings(seed=0, target_accuracy=0.5)  # a lower bar keeps the test short
    model, tok, report = pretrain(settings)
    assert report["stopped_on_criterion"]
    assert report["eval_operands_0_9"]["well_formed"] >= 0.9
    assert 0.5 < report["eval_operands_0_9"]["answer_accuracy"] <= 0.9
    save_tiny(model, tok, tmp_path, {"seed": 0, **report})
    assert (tmp_path / "training.json").is_file()
    loaded, loaded_tok = load_base_model(model_cfg("local", str(tmp_path)))
    assert loaded_tok.pad_token_id == tok.pad_token_id
    names = ["<|end|>", "<|assistant|>", "<|endoftext|>"]
    assert loaded.generation_config.eos_token_id == tok.convert_tokens_to_ids(names)
    prompts = chat_prompts(tok, 9)
    assert evaluate_greedy(loaded, loaded_tok, prompts) == evaluate_greedy(model, tok, prompts)


# --- local source --------------------------------------------------------------------


def test_local_loads_a_saved_model(tmp_path):
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    saved = Phi3ForCausalLM(build_tiny_config(hidden_size=32, num_layers=1, tokenizer=tok))
    saved.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    model, loaded_tok = load_base_model(model_cfg("local", str(tmp_path)))
    assert model.config.hidden_size == 32
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training
    assert loaded_tok.pad_token_id == tok.pad_token_id
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _gpt2_style(tmp_path, pad_is_eos: bool):
    """A tiny GPT-2 model whose tokenizer has no pad token (or pad == eos), built offline."""
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "a", "b", "c", "d", "e"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    extra = {"pad_token": "<|endoftext|>"} if pad_is_eos else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", padding_side="right", **extra
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=16)
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_local_adds_a_distinct_pad_token(tmp_path, caplog, pad_is_eos):
    saved = _gpt2_style(tmp_path, pad_is_eos)
    with caplog.at_level(logging.INFO, logger="so8t.model.loading"):
        model, tok = load_base_model(model_cfg("local", str(tmp_path)))
    assert "added <pad>" in caplog.text
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.get_input_embeddings().num_embeddings == len(tok) == 7
    assert model.config.pad_token_id == tok.pad_token_id
    assert all(not p.requires_grad for p in model.parameters())
    # Old rows untouched, new row deterministic (zero).
    old = saved.get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert torch.equal(new[: old.shape[0]], old)
    assert torch.count_nonzero(new[old.shape[0] :]) == 0
    enc = tok(["ab", "abcde"], padding=True, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.pad_token_id
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


def _saved_tiny_phi3(folder, hidden_size: int = 32, tokenizer=None):
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    Phi3ForCausalLM(build_tiny_config(hidden_size=hidden_size, num_heads=4, num_layers=1, tokenizer=tok)
                    ).save_pretrained(folder)
    (tokenizer or tok).save_pretrained(folder)
    return folder


def test_local_folder_without_weights_names_the_folder(tmp_path):
    folder = _saved_tiny_phi3(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotAvailableError, match=r"model.path=.*/m: the folder has a config.json but no weights"):
        load_base_model(model_cfg("local", str(folder)))


def test_local_folder_with_unknown_architecture_names_it(tmp_path):
    import json

    folder = _saved_tiny_phi3(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "phi99"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailableError, match=r"/m: config.json names model_type='phi99'.*does not know"):
        load_base_model(model_cfg("local", str(folder)))


def test_local_folder_with_a_foreign_tokenizer_is_refused(tmp_path):
    foreign = build_tiny_tokenizer()
    foreign.add_tokens([f"word{i}" for i in range(40)])  # ids past the model's embedding rows
    folder = _saved_tiny_phi3(tmp_path / "m", tokenizer=foreign)
    with pytest.raises(ModelNotAvailableError,
                       match=r"tokenizer has ids up to \d+ but the model has only \d+ embedding rows"):
        load_base_model(model_cfg("local", str(folder)))


def test_local_folder_with_truncated_weights_is_refused(tmp_path):
    folder = _saved_tiny_phi3(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelNotAvailableError, match=r"/m: the model or its tokenizer cannot be loaded"):
        load_base_model(model_cfg("local", str(folder)))


def test_hidden_size_the_so8_blocks_cannot_split_is_refused(tmp_path):
    from so8t.build import build_policy_and_tokenizer
    from so8t.errors import SetupError

    folder = _saved_tiny_phi3(tmp_path / "m", hidden_size=36)
    adapter = SimpleNamespace(kind="so8", layers=None, init_std=0.0)
    with pytest.raises(SetupError, match=r"adapter=so8 does not fit the model \(model.path=.*/m\).*hidden_size=36"):
        build_policy_and_tokenizer(model_cfg("local", str(folder)), adapter, torch.device("cpu"), torch.float32)


def test_hub_source_with_a_folder_path_reads_the_folder(tmp_path):
    folder = _saved_tiny_phi3(tmp_path / "m")
    model, _ = load_base_model(model_cfg("hub", str(folder)))
    assert model.config.hidden_size == 32


def test_local_missing_folder_names_model_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotAvailableError, match="model.path"):
        load_base_model(model_cfg("local", str(missing)))


def test_local_folder_without_config_names_model_path(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="model.path=.*config.json"):
        load_base_model(model_cfg("local", str(tmp_path)))


# --- hub source ----------------------------------------------------------------------


@pytest.mark.parametrize("local_files_only", [True, False])
def test_hub_model_not_cached_is_a_clear_error(monkeypatch, tmp_path, local_files_only):
    import huggingface_hub.constants

    # Nothing may try the network; an empty cache guarantees "not cached".
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model_id = "so8t-tests/not-a-cached-model"
    cfg = model_cfg("hub", model_id, local_files_only=local_files_only)
    with pytest.raises(ModelNotAvailableError) as info:
        load_base_model(cfg)
    message = str(info.value)
    assert f"model.path={model_id}" in message
    assert f"hf download {model_id}" in message
    assert "model=local model.path=" in message


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="model.kind"):
        load_base_model(model_cfg("ftp"))
