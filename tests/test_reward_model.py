"""The reward-model term against a small random sequence-classification model saved to a
folder: its scores are the model's, batching and padding do not change them, it renders chat
templates, refuses broken folders naming the key, and the running reward normaliser."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from so8t.config import CONF_DIR
from so8t.config.schema import RewardConfig
from so8t.errors import ModelNotAvailableError, SetupError
from so8t.model.tiny import build_tiny_tokenizer
from so8t.rewards import build_reward, check_reward_config
from so8t.rewards.normalize import EPS, RewardNormalizer
from so8t.rewards.reward_model import RewardModelTerm

KEY = "reward.terms.reward_model"
CHAT_TEMPLATE = "<bos>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"

PROMPTS = ["3+4=", "12+5=", "1+1=", "9+9="]
COMPLETIONS = [
    "<think></think><final>7</final>",
    "<final>17</final>",
    "2",
    "<think>9+9</think><final>18</final><|endoftext|>",
]
MESSAGES = [[{"role": "user", "content": p}] for p in PROMPTS]


def make_tokenizer(pad: bool = True, chat_template: str | None = None, padding_side: str = "left"):
    """The tiny arithmetic tokenizer with chat-role tokens and a BOS it adds by itself."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    if not pad:
        tok.pad_token = None
    tok.chat_template = chat_template
    tok.padding_side = padding_side
    return tok


def save_reward_model(folder: Path, tok, num_labels: int = 1, seed: int = 0) -> LlamaForSequenceClassification:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        num_labels=num_labels, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # logits of order 1, so different texts score clearly apart
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def direct_scores(model, tok, texts: list[str], add_special_tokens: bool, label: int = 0) -> list[float]:
    """The model called on each text alone: no padding, nothing from the term."""
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, label]))
    return scores


def reward_cfg(terms: dict):
    """A reward config node shaped exactly like the composed Hydra one."""
    return OmegaConf.structured(RewardConfig(terms=terms, skip_special_tokens=True, normalize=False, clip=None))


def term_cfg(path, **options):
    return reward_cfg({"reward_model": {"weight": 1.0, "path": str(path), **options}})


@pytest.fixture(scope="module")
def plain_rm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm_plain")
    tok = make_tokenizer()
    return folder, save_reward_model(folder, tok), tok


@pytest.fixture(scope="module")
def chat_rm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm_chat")
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE)
    return folder, save_reward_model(folder, tok, seed=1), tok


# --------------------------------------------------------------------------- scores


def test_scores_equal_a_direct_call_of_the_model(plain_rm):
    folder, model, tok = plain_rm
    term = RewardModelTerm(str(folder))
    scores = term(completions=COMPLETIONS, prompts=PROMPTS)
    expected = direct_scores(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS)], add_special_tokens=True)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 3) for s in scores}) == len(scores)  # the texts really score differently
    assert all(isinstance(s, float) for s in scores)


@pytest.mark.parametrize("saved_side", ["left", "right"])
def test_batched_equals_unbatched_whatever_the_saved_padding_side(tmp_path, saved_side):
    tok = make_tokenizer(padding_side=saved_side)
    save_reward_model(tmp_path, tok)
    one = RewardModelTerm(str(tmp_path), batch_size=1)(completions=COMPLETIONS, prompts=PROMPTS)
    for batch_size in (2, 3, 8):
        batched = RewardModelTerm(str(tmp_path), batch_size=batch_size)(completions=COMPLETIONS, prompts=PROMPTS)
        assert batched == pytest.approx(one, abs=1e-5), batch_size


def test_tokenizer_without_pad_token_pads_with_eos_and_batches_exactly(tmp_path):
    tok = make_tokenizer(pad=False)
    model = save_reward_model(tmp_path, tok)
    assert model.config.pad_token_id is None
    term = RewardModelTerm(str(tmp_path), batch_size=4)
    assert term.tokenizer.pad_token == tok.eos_token and term.model.config.pad_token_id == tok.eos_token_id
    texts = [p + c for p, c in zip(PROMPTS[:3], COMPLETIONS[:3])]  # none ends with EOS
    batched = term(completions=COMPLETIONS[:3], prompts=PROMPTS[:3])
    assert batched == pytest.approx(direct_scores(model, tok, texts, add_special_tokens=True), abs=1e-5)


def test_chat_template_renders_messages_and_the_completion(chat_rm):
    folder, model, tok = chat_rm
    term = RewardModelTerm(str(folder), batch_size=2)
    scores = term(completions=COMPLETIONS, prompts=["ignored"] * 4, messages=MESSAGES)
    texts = [
        tok.apply_chat_template(m + [{"role": "assistant", "content": c}], tokenize=False)
        for m, c in zip(MESSAGES, COMPLETIONS)
    ]
    assert texts[0] == "<bos><|user|>3+4=<|end|><|assistant|><think></think><final>7</final><|end|>"
    assert [text for text, _ in term.render(["ignored"] * 4, COMPLETIONS, MESSAGES)] == texts
    # The template carries the BOS: the tokenizer adds no second one.
    assert scores == pytest.approx(direct_scores(model, tok, texts, add_special_tokens=False), abs=1e-5)


def test_without_messages_the_prompt_text_and_completion_are_scored(chat_rm):
    folder, model, tok = chat_rm
    term = RewardModelTerm(str(folder))
    scores = term(completions=COMPLETIONS, prompts=PROMPTS, messages=None)
    expected = direct_scores(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS)], add_special_tokens=True)
    assert scores == pytest.approx(expected, abs=1e-5)


def test_long_texts_keep_their_last_max_length_tokens(plain_rm):
    folder, model, tok = plain_rm
    scores = RewardModelTerm(str(folder), max_length=5, batch_size=4)(completions=COMPLETIONS, prompts=PROMPTS)
    expected = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS):
            ids = tok(p + c)["input_ids"][-5:]
            expected.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert scores == pytest.approx(expected, abs=1e-5)


def test_label_index_selects_the_logit_and_a_wrong_one_is_refused(tmp_path):
    tok = make_tokenizer()
    model = save_reward_model(tmp_path, tok, num_labels=2)
    scores = RewardModelTerm(str(tmp_path), label_index=1)(completions=COMPLETIONS, prompts=PROMPTS)
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(direct_scores(model, tok, texts, True, label=1), abs=1e-5)
    with pytest.raises(SetupError, match=rf"{KEY}\.label_index=2 .*2 label"):
        build_reward(term_cfg(tmp_path, label_index=2))


def test_bfloat16_scores_follow_the_fp32_ones(plain_rm):
    folder, _, _ = plain_rm
    fp32 = RewardModelTerm(str(folder))(completions=COMPLETIONS, prompts=PROMPTS)
    term = RewardModelTerm(str(folder), dtype="bfloat16")
    assert next(term.model.parameters()).dtype == torch.bfloat16
    assert term(completions=COMPLETIONS, prompts=PROMPTS) == pytest.approx(fp32, abs=0.1)


# --------------------------------------------------------------------------- as a reward term


def test_reward_model_is_a_weighted_term_loaded_once_and_receives_messages(chat_rm, monkeypatch):
    import transformers

    folder, model, tok = chat_rm
    loads = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForSequenceClassification, "from_pretrained",
        lambda *a, **k: loads.append(a) or original(*a, **k),
    )
    cfg = reward_cfg({
        "format": {"weight": 0.2},
        "reward_model": {"weight": 0.5, "path": str(folder), "batch_size": 3},
    })
    assert check_reward_config(cfg) == [] and loads == []  # validation loads nothing
    reward = build_reward(cfg)
    assert len(loads) == 1
    args = dict(completions=COMPLETIONS, prompts=PROMPTS, references=["7", "17", "2", "18"],
                eos=[True] * 4, num_tokens=[5] * 4, max_new_tokens=10)
    first = reward(**args, messages=MESSAGES)
    second = reward(**args, messages=MESSAGES)
    assert len(loads) == 1 and first.total == second.total
    texts = [tok.apply_chat_template(m + [{"role": "assistant", "content": c}], tokenize=False)
             for m, c in zip(MESSAGES, COMPLETIONS)]
    rm = direct_scores(model, tok, texts, add_special_tokens=False)
    assert first.per_term["reward_model"] == pytest.approx(rm, abs=1e-5)
    fmt = first.per_term["format"]
    assert fmt == [1.0, 0.0, 0.0, 0.0]
    assert first.total == pytest.approx([0.2 * f + 0.5 * s for f, s in zip(fmt, rm)], abs=1e-5)
    # Callers that pass no messages (the argument is optional) score prompt + completion.
    plain = reward(**args)
    expected = direct_scores(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS)], add_special_tokens=True)
    assert plain.per_term["reward_model"] == pytest.approx(expected, abs=1e-5)


def test_a_second_reward_model_by_target_class(plain_rm, chat_rm):
    cfg = reward_cfg({
        "reward_model": {"weight": 1.0, "path": str(plain_rm[0])},
        "other": {"weight": 1.0, "_target_": "so8t.rewards.reward_model.RewardModelTerm",
                  "path": str(chat_rm[0]), "batch_sise": 2},
    })
    assert check_reward_config(cfg) == [
        "reward.terms.other.batch_sise: unknown option of the reward model term (options: path, device, "
        "dtype, batch_size, max_length, label_index, local_files_only, trust_remote_code)"
    ]
    del cfg.terms.other["batch_sise"]
    cfg.terms.other.batch_size = 2
    reward = build_reward(cfg)
    result = reward(completions=COMPLETIONS, prompts=PROMPTS, references=[None] * 4, eos=[True] * 4,
                    num_tokens=[3] * 4, max_new_tokens=8)
    assert result.per_term["reward_model"] != result.per_term["other"]


def test_messages_reach_every_term_and_are_checked():
    seen = {}

    def spy(completions, messages, **kwargs):
        seen["messages"] = messages
        return [0.0] * len(completions)

    from so8t.rewards import RewardFunction, RewardTerm

    reward = RewardFunction([RewardTerm("spy", spy, 1.0)])
    args = dict(completions=["a", "b"], prompts=["p", "q"], references=[None, None], eos=[True, True],
                num_tokens=[1, 1], max_new_tokens=4)
    reward(**args)
    assert seen["messages"] is None
    reward(**args, messages=MESSAGES[:2])
    assert seen["messages"] == MESSAGES[:2]
    with pytest.raises(ValueError, match="2 completions but 1 messages"):
        reward(**args, messages=MESSAGES[:1])
    cfg = reward_cfg({"format": {"messages": []}})
    assert any("reward.terms.format.messages" in p for p in check_reward_config(cfg))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("options,needle", [
    ({"path": ""}, f"{KEY}.path must be set"),
    ({"path": "x", "batch_size": 0}, f"{KEY}.batch_size=0 must be an integer >= 1"),
    ({"path": "x", "batch_size": 2.5}, f"{KEY}.batch_size=2.5 must be an integer >= 1"),
    ({"path": "x", "max_length": -1}, f"{KEY}.max_length=-1 must be an integer >= 1"),
    ({"path": "x", "label_index": -1}, f"{KEY}.label_index=-1 must be an integer >= 0"),
    ({"path": "x", "dtype": "fp8"}, f"{KEY}.dtype='fp8' must be one of"),
    ({"path": "x", "device": "gpu"}, f"{KEY}.device='gpu' must be cpu, cuda, cuda:N or auto"),
    ({"path": "x", "local_files_only": "yes"}, f"{KEY}.local_files_only='yes' must be true or false"),
    ({"path": "x", "max_len": 8}, f"{KEY}.max_len: unknown option of the reward model term"),
])
def test_bad_options_are_reported_by_check_reward_config_naming_the_key(options, needle):
    problems = check_reward_config(reward_cfg({"reward_model": options}))
    assert len(problems) == 1 and problems[0].startswith(needle), problems


def test_preset_requires_the_path_and_is_otherwise_valid():
    preset = OmegaConf.load(CONF_DIR / "reward" / "model.yaml")
    assert check_reward_config(preset) == [f"{KEY}.path must be set (it is ???)"]
    preset.terms.reward_model.path = "/does/not/exist"
    assert check_reward_config(preset) == []  # options are checked; nothing is loaded


def test_missing_folder_is_refused_naming_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotAvailableError, match=rf"{KEY}\.path={missing}: no such folder"):
        build_reward(term_cfg(missing))


def test_folder_without_weights_is_refused_naming_key_and_folder(tmp_path, plain_rm):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((plain_rm[0] / name).read_bytes())
    with pytest.raises(ModelNotAvailableError, match=rf"{KEY}\.path={folder}: cannot load a reward model"):
        build_reward(term_cfg(folder))
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotAvailableError, match=rf"{KEY}\.path={folder}: the folder has no config.json"):
        build_reward(term_cfg(folder))


def test_causal_lm_checkpoint_is_refused_not_given_a_random_head(tmp_path):
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailableError, match=rf"{KEY}\.path=.*no trained classification head.*score"):
        build_reward(term_cfg(tmp_path))


def test_unknown_architecture_is_refused(tmp_path, plain_rm):
    folder, _, _ = plain_rm
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailableError, match=rf"{KEY}\.path=.*does not hold a sequence-classification"):
        build_reward(term_cfg(tmp_path))


def test_hub_id_absent_from_the_cache_is_refused_with_the_policy_wording(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        build_reward(term_cfg("so8t-tests/absent-reward-model"))
    message = str(info.value)
    assert message.startswith(f"{KEY}.path=so8t-tests/absent-reward-model: no such folder")
    assert "not in the local Hugging Face cache" in message and "local_files_only=true" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(plain_rm):
    with pytest.raises(SetupError, match=rf"{KEY}\.device=cuda but CUDA is not available"):
        build_reward(term_cfg(plain_rm[0], device="cuda"))


@pytest.mark.slow
def test_cli_exits_2_naming_the_reward_model_folder(tmp_path):
    missing = tmp_path / "absent_rm"
    proc = subprocess.run(
        [sys.executable, "-m", "so8t.train", "output.progress_bars=false", "reward=model",
         f"reward.terms.reward_model.path={missing}", "max_steps=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert f"{KEY}.path={missing}: no such folder" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_cli_trains_with_a_reward_model(tmp_path, plain_rm):
    proc = subprocess.run(
        [sys.executable, "-m", "so8t.train", "output.progress_bars=false", "reward=model",
         f"reward.terms.reward_model.path={plain_rm[0]}", "reward.terms.reward_model.batch_size=3",
         "max_steps=2", "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1", "run_name=rm"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "outputs/default/runs/rm/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward/reward_model"]) for r in rows)
    assert rows[0]["reward/reward_model"] != 0.0


# --------------------------------------------------------------------------- normaliser


def batches(seed: int = 0, sizes=(8, 3, 5, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * 3.0 + 2.0 for n in sizes]


def test_disabled_normalizer_is_the_identity():
    norm = RewardNormalizer(enabled=False)
    for batch in batches():
        assert torch.equal(norm(batch), batch)
    assert norm.state_dict() == {"count": 0, "mean": 0.0, "m2": 0.0}


def test_normalizer_uses_the_mean_and_std_of_everything_seen():
    norm = RewardNormalizer(enabled=True)
    seen: list[torch.Tensor] = []
    for batch in batches():
        out = norm(batch)
        seen.append(batch)
        history = torch.cat(seen).double()
        assert norm.count == history.numel()
        assert norm.mean == pytest.approx(float(history.mean()), rel=1e-12)
        assert norm.std == pytest.approx(float(history.std(correction=0)), rel=1e-12)
        expected = (batch.double() - history.mean()) / torch.sqrt(history.var(correction=0) + EPS)
        assert out.dtype == batch.dtype
        assert torch.allclose(out.double(), expected, atol=1e-6)


def test_normalizer_state_round_trip_gives_identical_future_outputs(tmp_path):
    first, *rest = batches(seed=3, sizes=(8, 8, 4, 8, 8))
    uninterrupted = RewardNormalizer(enabled=True, clip=1.5)
    uninterrupted(first)
    uninterrupted(rest[0])
    torch.save(uninterrupted.state_dict(), tmp_path / "state.pt")
    resumed = RewardNormalizer(enabled=True, clip=1.5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert resumed.state_dict() == uninterrupted.state_dict()
    for batch in rest[1:]:
        assert torch.equal(resumed(batch), uninterrupted(batch))
    assert resumed.state_dict() == uninterrupted.state_dict()
    # A fresh normaliser (no restored statistics) would have normalised differently.
    assert not torch.equal(RewardNormalizer(enabled=True)(rest[1]), uninterrupted(rest[1]))


def test_clipping_bounds_the_normalised_and_the_raw_reward():
    spread = torch.tensor([-100.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0])
    clipped = RewardNormalizer(enabled=True, clip=1.0)(spread)
    assert clipped.abs().max() == 1.0 and clipped[0] == -1.0 and clipped[-1] == 1.0
    raw = RewardNormalizer(enabled=False, clip=2.0)(torch.tensor([-5.0, 0.5, 5.0]))
    assert raw.tolist() == [-2.0, 0.5, 2.0]


def test_normalizer_refuses_bad_clip_state_and_input():
    for clip in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="reward.clip"):
            RewardNormalizer(enabled=True, clip=clip)
    norm = RewardNormalizer(enabled=True)
    with pytest.raises(ValueError, match="keys"):
        norm.load_state_dict({"count": 1, "mean": 0.0})
    with pytest.raises(ValueError, match="count"):
        norm.load_state_dict({"count": -1, "mean": 0.0, "m2": 0.0})
    with pytest.raises(ValueError, match="non-finite"):
        norm(torch.tensor([1.0, math.nan]))


def test_reward_clip_must_be_positive_in_the_config():
    from hydra import compose, initialize_config_dir

    from so8t.config import register
    from so8t.config.validate import ConfigValidationError, validate

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["reward.clip=0", "reward.normalize=true"])
    with pytest.raises(ConfigValidationError, match=r"reward\.clip=0\.0 must be > 0"):
        validate(cfg)
