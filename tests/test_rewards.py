"""Reward terms: the strict format parser, built-ins, weighting, TRL and user terms, config errors."""

from __future__ import annotations

import functools
import math

import pytest
from omegaconf import OmegaConf

from so8t.config.schema import RewardConfig
from so8t.errors import SetupError
from so8t.rewards import BUILTIN_TERMS, RewardResult, build_reward, check_reward_config, parse_answer
from so8t.rewards.terms import eos_reward, exact_match_reward, format_reward, length_penalty

GOOD = "<think>add</think><final>7</final>"


# --------------------------------------------------------------------------- user terms
# Referenced by dotted path from the configs below; `tests` is a package so they import.


def my_reward(completions, prompts, references, bonus=0.0, **kwargs):
    """Length of the completion in characters, plus a configured bonus."""
    assert all(isinstance(c, str) for c in completions)  # plain strings for non-TRL terms
    return [len(c) + bonus for c in completions]


def skip_all(completions, **kwargs):
    return [None for _ in completions]


def wrong_length(completions, **kwargs):
    return [1.0]


def no_kwargs(completions):
    return [0.0 for _ in completions]


def nan_reward(completions, **kwargs):
    return [math.nan for _ in completions]


def reward_cfg(terms: dict):
    """A reward config node shaped exactly like the composed Hydra one."""
    return OmegaConf.structured(RewardConfig(terms=terms, skip_special_tokens=True, normalize=False, clip=None))


def call(reward, completions, references=None, eos=None, num_tokens=None, max_new_tokens=10) -> RewardResult:
    n = len(completions)
    return reward(
        completions=completions,
        prompts=["3+4="] * n,
        references=references if references is not None else ["7"] * n,
        eos=eos if eos is not None else [True] * n,
        num_tokens=num_tokens if num_tokens is not None else [5] * n,
        max_new_tokens=max_new_tokens,
    )


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text, think, final",
    [
        (GOOD, "add", "7"),
        ("<think></think><final>20</final>", "", "20"),
        ("  \n<think> a\nb </think>\n<final> 7 </final>\n ", "a\nb", "7"),  # whitespace around and between
        ("<think>x</think><final></final>", "x", ""),
    ],
)
def test_parse_accepts(text, think, final):
    parsed = parse_answer(text)
    assert parsed is not None
    assert (parsed.think, parsed.final) == (think, final)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "7",
        "<final>7</final>",  # no think block
        "<think>x</think>",  # no final block
        "<think>x</think>7",
        "hi <think>x</think><final>7</final>",  # text before
        "<think>x</think><final>7</final> bye",  # text after
        "<think>x</think> so <final>7</final>",  # text between
        "<final>7</final><think>x</think>",  # wrong order
        "<think>x</think><final>7</final><final>8</final>",  # duplicate final
        "<think>x</think><think>y</think><final>7</final>",  # duplicate think
        "<think><think>x</think></think><final>7</final>",  # nested
        "<think>x</think><final>7<final>8</final></final>",  # nested final
        "<think>x<final>7</final></think><final>7</final>",  # tag inside think
        "<think>x</think><final>7",  # unclosed
        "<Think>x</Think><final>7</final>",  # tags are case-sensitive
    ],
)
def test_parse_rejects(text):
    assert parse_answer(text) is None


# --------------------------------------------------------------------------- built-ins


def test_builtin_registry():
    assert set(BUILTIN_TERMS) == {"format", "exact_match", "eos", "length"}


def test_format_term():
    assert format_reward(completions=[GOOD, "7", GOOD + "x"]) == [1.0, 0.0, 0.0]


def test_exact_match_term():
    completions = [GOOD, "<think></think><final> 7\n</final>", "<think></think><final>8</final>", "7", GOOD]
    references = ["7", " 7 ", "7", "7", None]
    # Unparsable scores 0 even with the right digits; no reference scores None.
    assert exact_match_reward(completions=completions, references=references) == [1.0, 1.0, 0.0, 0.0, None]


def test_eos_term():
    assert eos_reward(completions=["a", "b"], eos=[True, False]) == [1.0, 0.0]


def test_length_term():
    num_tokens = [0, 5, 10, 12]
    assert length_penalty(completions=[""] * 4, num_tokens=num_tokens, max_new_tokens=10) == [0.0, -0.5, -1.0, -1.0]
    late = length_penalty(completions=[""] * 4, num_tokens=num_tokens, max_new_tokens=10, start_fraction=0.5)
    assert late == [0.0, 0.0, -1.0, -1.0]
    assert length_penalty(completions=[""], num_tokens=[8], max_new_tokens=10, start_fraction=0.6) == [
        pytest.approx(-0.5)
    ]
    with pytest.raises(ValueError, match="start_fraction"):
        length_penalty(completions=[""], num_tokens=[1], max_new_tokens=10, start_fraction=1.0)


# --------------------------------------------------------------------------- weighted reward


def test_weighted_total_and_per_term():
    reward = build_reward(
        reward_cfg(
            {
                "format": {"weight": 0.2},
                "exact_match": {"weight": 1.0},
                "eos": {"weight": 0.5},
                "length": {"weight": 0.1, "start_fraction": 0.5},
            }
        )
    )
    result = call(
        reward,
        [GOOD, "<think></think><final>8</final>", "garbage", GOOD],
        references=["7", "7", "7", None],
        eos=[True, True, False, True],
        num_tokens=[5, 5, 10, 5],
    )
    assert result.per_term == {
        "format": [1.0, 1.0, 0.0, 1.0],
        "exact_match": [1.0, 0.0, 0.0, None],
        "eos": [1.0, 1.0, 0.0, 1.0],
        "length": [0.0, 0.0, -1.0, 0.0],
    }
    assert result.total == pytest.approx([1.7, 0.7, -0.1, 0.7])  # None counts as 0
    means = result.means()
    assert means["exact_match"] == pytest.approx(1 / 3)  # None is left out of the mean
    assert means["format"] == pytest.approx(0.75)


def test_zero_weight_term_is_logged_but_not_counted():
    reward = build_reward(reward_cfg({"format": {"weight": 0.0}, "eos": {"weight": 1.0}}))
    result = call(reward, [GOOD, "x"], eos=[False, False])
    assert result.per_term["format"] == [1.0, 0.0]
    assert result.total == [0.0, 0.0]


def test_accepts_the_typed_config():
    reward = build_reward(RewardConfig(terms={"format": {"weight": 2.0}, "length": {"start_fraction": 0.5}},
                                       skip_special_tokens=True, normalize=False, clip=None))
    assert call(reward, [GOOD], num_tokens=[10]).total == [1.0]  # 2 * 1 + 1 * -1


# --------------------------------------------------------------------------- TRL and user terms


def test_trl_think_format_reward_as_term():
    from trl.rewards import think_format_reward

    # TRL's function wants conversational completions and fails on plain strings, which is
    # why terms from `trl` get their completions wrapped as one assistant message each.
    assert think_format_reward([[{"content": "<think>r</think>answer"}]]) == [1.0]
    with pytest.raises(TypeError):
        think_format_reward(["<think>r</think>answer"])

    reward = build_reward(reward_cfg({"think": {"weight": 2.0, "_target_": "trl.rewards.think_format_reward",
                                                  "_partial_": True}}))
    assert reward.terms[0].conversational
    result = call(reward, ["<think>r</think>answer", GOOD, "no think"])
    assert result.per_term["think"] == [1.0, 1.0, 0.0]
    assert result.total == [2.0, 2.0, 0.0]


def test_user_target_term_with_options_is_a_partial_built_by_hydra():
    reward = build_reward(
        reward_cfg({"mine": {"weight": 0.5, "_target_": "tests.test_rewards.my_reward", "_partial_": True,
                             "bonus": 1.0}})
    )
    assert not reward.terms[0].conversational
    fn = reward.terms[0].fn
    assert isinstance(fn, functools.partial) and fn.func is my_reward and fn.keywords == {"bonus": 1.0}
    result = call(reward, ["ab", "abcd"])
    assert result.per_term["mine"] == [3.0, 5.0]
    assert result.total == [1.5, 2.5]


def test_term_returning_none_counts_as_zero():
    skip = {"_target_": "tests.test_rewards.skip_all", "_partial_": True}
    reward = build_reward(reward_cfg({"skip": skip, "format": {}}))
    result = call(reward, [GOOD, "x"])
    assert result.total == [1.0, 0.0]
    assert result.means()["skip"] is None


def test_term_returning_wrong_length_is_named():
    reward = build_reward(reward_cfg({"short": {"_target_": "tests.test_rewards.wrong_length", "_partial_": True}}))
    with pytest.raises(ValueError, match="reward term 'short' returned 1 scores for 3 completions"):
        call(reward, ["a", "b", "c"])


def test_term_returning_nan_is_named():
    reward = build_reward(reward_cfg({"bad": {"_target_": "tests.test_rewards.nan_reward", "_partial_": True}}))
    with pytest.raises(ValueError, match="reward term 'bad' returned a non-finite score"):
        call(reward, ["a"])


# --------------------------------------------------------------------------- config errors


def test_unknown_builtin_names_key_and_lists_builtins():
    with pytest.raises(SetupError) as info:
        build_reward(reward_cfg({"formatt": {"weight": 1.0}}))
    message = str(info.value)
    assert "reward.terms.formatt" in message
    for name in BUILTIN_TERMS:
        assert name in message


def test_unimportable_target_names_key_and_path():
    errors = check_reward_config(reward_cfg({"x": {"_target_": "no_such_module.fn"}}))
    assert len(errors) == 1
    assert "reward.terms.x._target_" in errors[0] and "no_such_module.fn" in errors[0]
    with pytest.raises(SetupError, match="reward.terms.x._target_"):
        build_reward(reward_cfg({"x": {"_target_": "trl.rewards.no_such_reward"}}))


def test_check_reward_config_collects_all_problems():
    cfg = reward_cfg(
        {
            "format": {"weight": math.inf},
            "length": {"start_frac": 0.5},
            "eos": {"num_tokens": 3},
            "plain": {"_target_": "tests.test_rewards.no_kwargs", "_partial_": True},
            "factory": {"_target_": "trl.rewards.get_soft_overlong_punishment", "_partial_": True},
            "typo": {},
        }
    )
    errors = check_reward_config(cfg)
    text = "\n".join(errors)
    assert "reward.terms.format.weight must be finite" in text
    assert "reward.terms.length.start_frac: unknown option" in text and "start_fraction" in text
    assert "reward.terms.eos.num_tokens" in text
    assert "reward.terms.plain._target_" in text and "**kwargs" in text
    assert "reward.terms.factory._target_" in text
    assert "reward.terms.typo: unknown built-in" in text
    assert len(errors) == 6


def test_check_reward_config_option_values_and_empty():
    errors = check_reward_config(reward_cfg({"length": {"start_fraction": 1.5}}))
    assert errors == ["reward.terms.length.start_fraction must be a number in [0, 1), got 1.5"]
    assert check_reward_config(reward_cfg({})) == ["reward.terms is empty: configure at least one reward term"]
    assert check_reward_config(reward_cfg({"format": {}, "exact_match": {"weight": 1}})) == []


def test_partial_must_match_what_the_target_is():
    errors = check_reward_config(reward_cfg({
        "fn": {"_target_": "tests.test_rewards.skip_all"},  # a function without _partial_: true
        "cls": {"_target_": "so8t.rewards.reward_model.RewardModelTerm", "_partial_": True, "path": "/x"},
        "odd": {"_target_": "tests.test_rewards.skip_all", "_partial_": "yes"},
    }))
    assert errors == [
        "reward.terms.fn._partial_: tests.test_rewards.skip_all is a function, called on every batch with its "
        "options: set reward.terms.fn._partial_=true (in YAML, _partial_: true beside _target_)",
        "reward.terms.cls._partial_: so8t.rewards.reward_model.RewardModelTerm is a class, built once per run "
        "with its options; remove reward.terms.cls._partial_",
        "reward.terms.odd._partial_ must be true or false, got 'yes'",
    ]


def test_an_option_named_like_a_standard_argument_or_left_missing_is_refused():
    errors = check_reward_config(reward_cfg({
        "mine": {"_target_": "tests.test_rewards.my_reward", "_partial_": True, "completions": [], "bonus": "???"},
    }))
    assert "reward.terms.mine.bonus must be set (it is ???)" in errors
    assert any(e.startswith("reward.terms.mine.completions: 'completions' is passed to every term") for e in errors)


def test_terms_added_from_the_command_line_keep_working():
    from so8t.build import check_config
    from tests.conftest import compose

    cfg = compose(["+reward.terms.length.weight=0.1", "+reward.terms.length.start_fraction=0.5",
                   "reward.terms.format.weight=0.3",
                   "+reward.terms.mine={_target_:tests.test_rewards.my_reward,_partial_:true,weight:2}",
                   "+reward.terms.mine.bonus=1.5"])
    assert check_config(cfg) == []
    reward = build_reward(cfg.reward)
    assert reward.weights == {"format": 0.3, "exact_match": 1.0, "length": 0.1, "mine": 2.0}
    length = next(t for t in reward.terms if t.name == "length")
    assert length.fn.func is length_penalty and length.fn.keywords == {"start_fraction": 0.5}
    result = call(reward, [GOOD], num_tokens=[10])
    assert result.per_term["length"] == [-1.0] and result.per_term["mine"] == [len(GOOD) + 1.5]
