"""Prompt data: arithmetic and JSON-lines sources, chat templates, errors, resumable sampler."""

from __future__ import annotations

import json

import pytest

from so8t.config.typed import option_config
from so8t.config.validate import ConfigValidationError
from so8t.data import PromptSampler, build_prompts
from so8t.data.prompts import render_user_prompts
from tests.conftest import compose, typed_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None = None):
    """A tiny offline tokenizer: whitespace-split words over a fixed vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "be", "brief", "what", "is", "2+2?"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", chat_template=chat_template
    )


def arithmetic(**overrides):
    """Bare questions unless a test asks for the system prompt and instruction."""
    return option_config("data", "arithmetic", **{"system_prompt": None, "instruction": None, **overrides})


def write_jsonl(path, rows):
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl(path, **overrides):
    return option_config("data", "jsonl", path=str(path), **overrides)


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_prompts_are_deterministic_per_seed():
    first = build_prompts(arithmetic(num_prompts=20, seed=1))
    assert first == build_prompts(arithmetic(num_prompts=20, seed=1))
    assert first != build_prompts(arithmetic(num_prompts=20, seed=2))
    assert len(first) == 20 and len(set(first)) == 20  # distinct questions
    for prompt in first:
        a, b = prompt.text.removesuffix("=").split("+")
        assert prompt.text.endswith("=")
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
        assert prompt.reference == str(int(a) + int(b))


def test_arithmetic_uses_every_pair_once_when_asked_for_more():
    prompts = build_prompts(arithmetic(num_prompts=1000, min_operand=2, max_operand=4, seed=3))
    texts = [p.text for p in prompts]
    assert sorted(texts) == sorted(f"{a}+{b}=" for a in range(2, 5) for b in range(2, 5))
    shuffled_again = [p.text for p in build_prompts(arithmetic(num_prompts=9, min_operand=2, max_operand=4, seed=4))]
    assert sorted(shuffled_again) == sorted(texts) and shuffled_again != texts  # order depends on the seed


def test_arithmetic_does_not_touch_the_global_rng():
    import random

    random.seed(0)
    expected = random.random()
    random.seed(0)
    build_prompts(arithmetic(num_prompts=5))
    assert random.random() == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.min_operand=5", "data.max_operand=3"], "data.max_operand=3 must be >= data.min_operand=5"),
        (["data.min_operand=-1"], "data.min_operand=-1 must be >= 0"),
        (["data.num_prompts=0"], "data.num_prompts=0 must be > 0"),
        (["data.kind=csv"], "data.kind='csv' is not one of"),
    ],
)
def test_arithmetic_bad_settings_are_refused_with_the_config_naming_the_key(overrides, message):
    with pytest.raises(ConfigValidationError, match=message):
        typed_config(overrides)


# --------------------------------------------------------------------------- jsonl


def test_jsonl_custom_fields_missing_reference_and_blank_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"q": "what is 2+2?", "a": "4", "sys": "be brief"},
            "",
            {"q": "no answer here", "a": None},
            {"q": "nothing else"},
            {"q": "number answer", "a": 42},
        ],
    )
    prompts = build_prompts(jsonl(path, prompt_field="q", reference_field="a", system_field="sys"))
    # No tokenizer: plain text, the system text prepended with a newline.
    assert [(p.text, p.reference) for p in prompts] == [
        ("be brief\nwhat is 2+2?", "4"),
        ("no answer here", None),
        ("nothing else", None),
        ("number answer", "42"),
    ]
    assert prompts[0].chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    assert prompts[0].input_ids is None


def test_jsonl_null_reference_and_system_fields_in_config(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "reference": "x", "system": "s"}])
    prompts = build_prompts(jsonl(path, reference_field=None, system_field=None))
    assert [(p.text, p.reference) for p in prompts] == [("hi", None)]


def test_jsonl_uses_chat_template_when_the_tokenizer_has_one(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is 2+2?", "system": "be brief"}, {"prompt": "what is"}])
    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    prompts = build_prompts(jsonl(path), tokenizer)
    assert [p.text for p in prompts] == [
        "<|system|> be brief <|user|> what is 2+2? <|assistant|>",
        "<|user|> what is <|assistant|>",
    ]
    forced = build_prompts(jsonl(path, chat_template=True), tokenizer)
    assert forced == prompts
    plain = build_prompts(jsonl(path, chat_template=False), tokenizer)
    assert plain[0].text == "be brief\nwhat is 2+2?"


def test_jsonl_without_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is 2+2?", "system": "be brief"}])
    tokenizer = make_tokenizer()
    assert build_prompts(jsonl(path), tokenizer)[0].text == "be brief\nwhat is 2+2?"
    with pytest.raises(ValueError, match="data.chat_template=true but the tokenizer has no chat template"):
        build_prompts(jsonl(path, chat_template=True), tokenizer)
    with pytest.raises(ValueError, match="data.chat_template=true but no tokenizer"):
        build_prompts(jsonl(path, chat_template=True))


@pytest.mark.parametrize("value, expected", [(True, "<|user|>"), (False, "what is")])
def test_jsonl_chat_template_accepts_booleans(tmp_path, value, expected):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is"}])
    assert build_prompts(jsonl(path, chat_template=value), make_tokenizer(CHAT_TEMPLATE))[0].text.startswith(expected)


def test_jsonl_prompt_too_long_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is"}, {"prompt": "what is 2+2? be brief"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: prompt is 5 tokens, longer than data\.max_prompt_tokens=4"):
        build_prompts(jsonl(path, max_prompt_tokens=4, chat_template=False), make_tokenizer())


def test_jsonl_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path.*nope.jsonl"):
        build_prompts(jsonl(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "a"}', "{not json"], r"p\.jsonl:2: invalid JSON"),
        (['{"prompt": "a"}', "", '{"question": "b"}'],
         r"p\.jsonl:3: missing prompt field 'prompt' \(data.prompt_field\) or messages field 'messages'.*question"),
        (['{"messages": []}'], r"p\.jsonl:1: field 'messages' \(data.messages_field\) must be a non-empty list"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], r"p\.jsonl:1: field 'messages' .*\[0\] must be"),
        (['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'],
         r"p\.jsonl:1: .*must end with a user turn"),
        (['{"prompt": null}'], r"p\.jsonl:1: prompt field 'prompt' \(data.prompt_field\) is null"),
        (['["a"]'], r"p\.jsonl:1: expected a JSON object"),
        (['{"prompt": "a", "reference": [1]}'], r"p\.jsonl:1: field 'reference' \(data.reference_field\)"),
        (["", "  "], r"holds no prompts"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        build_prompts(jsonl(path))


def test_jsonl_is_read_as_utf8(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "日本語の質問", "reference": "答え"}\n'.encode("utf-8"))
    assert [(p.text, p.reference) for p in build_prompts(jsonl(path))] == [("日本語の質問", "答え")]


def test_jsonl_reads_chat_messages_as_hf_chat_datasets_store_them(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is"},
                {"role": "assistant", "content": "is"}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": messages, "reference": "4"}])
    prompt = build_prompts(jsonl(path), make_tokenizer(CHAT_TEMPLATE))[0]
    assert prompt.chat() == messages
    assert prompt.text == "<|system|> be brief <|user|> what is <|assistant|> is <|user|> 2+2? <|assistant|>"
    assert prompt.reference == "4"


def test_system_prompt_and_instruction_ask_every_source(tmp_path):
    from so8t.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = arithmetic(num_prompts=1, system_prompt="Answer in the form <think></think><final>the sum</final>",
                     instruction="Add the two numbers:")
    prompt = build_prompts(cfg, tok)[0]
    question = prompt.chat()[-1]["content"]
    assert question.startswith("Add the two numbers: ") and question.endswith("=")
    assert prompt.text == tok.apply_chat_template(prompt.chat(), tokenize=False, add_generation_prompt=True)
    assert prompt.text.startswith("<|system|>\nAnswer in the form") and prompt.text.endswith("<|assistant|>\n")
    # A rendered template already holds its special tokens: encoding adds none.
    assert list(prompt.input_ids) == tok(prompt.text, add_special_tokens=False)["input_ids"]
    # JSONL rows that bring their own system text keep it; the instruction is added to the user turn.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "system": "own"}, {"prompt": "3+3="}])
    rows = build_prompts(jsonl(path, system_prompt="default", instruction="Add:"), make_tokenizer(CHAT_TEMPLATE))
    assert [p.chat() for p in rows] == [
        [{"role": "system", "content": "own"}, {"role": "user", "content": "Add: 2+2="}],
        [{"role": "system", "content": "default"}, {"role": "user", "content": "Add: 3+3="}],
    ]


def test_without_a_chat_template_prompts_get_the_tokenizers_special_tokens():
    from tokenizers import processors

    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    prompt = build_prompts(arithmetic(num_prompts=1, max_operand=0, system_prompt="be brief"), tok)[0]
    assert prompt.text == "be brief\n0+0="
    assert prompt.input_ids[0] == tok.convert_tokens_to_ids("<s>")  # a base model's BOS


def test_chat_template_must_be_a_boolean_or_null():
    # In a config the schema refuses anything else while composing ...
    with pytest.raises(Exception, match="chat_template"):
        compose(["data.chat_template=auto"])
    # ... and a recorded setting (final/policy.json's prompting) is checked where it is read.
    for value in ("true", "auto", 1):
        with pytest.raises(ValueError, match="data.chat_template must be true, false or null"):
            render_user_prompts(["what is"], make_tokenizer(CHAT_TEMPLATE), chat_template=value)


# --------------------------------------------------------------------------- sampler


def drain(sampler: PromptSampler, batches: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(batches)]


def test_sampler_is_deterministic_and_seed_dependent():
    assert drain(PromptSampler(10, 3, seed=7), 8) == drain(PromptSampler(10, 3, seed=7), 8)
    assert drain(PromptSampler(10, 3, seed=7), 8) != drain(PromptSampler(10, 3, seed=8), 8)


def test_sampler_walks_permutations_across_epoch_boundaries():
    sampler = PromptSampler(5, 3, seed=0)
    flat = [i for batch in drain(sampler, 10) for i in batch]  # 30 indices = 6 epochs
    epochs = [flat[k : k + 5] for k in range(0, 30, 5)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # each epoch reshuffles
    assert (sampler.epoch, sampler.index) == (6, 0)


def test_sampler_batch_larger_than_dataset_spans_several_epochs():
    sampler = PromptSampler(3, 8, seed=1)
    batch = sampler.next_batch()
    assert len(batch) == 8
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]
    assert (sampler.epoch, sampler.index) == (2, 2)


def test_sampler_does_not_touch_global_rngs():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    PromptSampler(10, 4, seed=3).next_batch()
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 7])
def test_sampler_state_round_trip_equals_uninterrupted(stop_after):
    uninterrupted = drain(PromptSampler(7, 3, seed=5), 10)

    first = PromptSampler(7, 3, seed=5)
    before = drain(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    assert set(state) == {"seed", "epoch", "index", "num_items", "batch_size"}

    resumed = PromptSampler(7, 3, seed=5)
    resumed.load_state_dict(state)
    assert before + drain(resumed, 10 - stop_after) == uninterrupted


def test_sampler_restores_saved_seed_and_rejects_other_dataset():
    first = PromptSampler(6, 2, seed=11)
    drain(first, 4)
    resumed = PromptSampler(6, 2, seed=99)  # the checkpoint's seed wins
    resumed.load_state_dict(first.state_dict())
    assert drain(resumed, 5) == drain(first, 5)
    with pytest.raises(ValueError, match="6 prompts.*5"):
        PromptSampler(5, 2, seed=11).load_state_dict(first.state_dict())


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError):
        PromptSampler(0, 2, seed=0)
    with pytest.raises(ValueError):
        PromptSampler(3, 0, seed=0)
