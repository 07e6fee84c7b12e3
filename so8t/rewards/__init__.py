"""Reward terms and the weighted reward the PPO loop optimises.

Configuration
-------------
``reward.terms`` maps a term name to ``{weight, _target_, kwargs}``::

    reward:
      terms:
        format: {weight: 0.2}                       # built-in, found by its name
        exact_match: {weight: 1.0}
        length: {weight: 0.1, kwargs: {start_fraction: 0.5}}
        think: {weight: 0.1, _target_: trl.rewards.think_format_reward}
        mine: {weight: 1.0, _target_: my_package.rewards.brevity, kwargs: {limit: 40}}

The total reward of a completion is ``sum(weight * score)``; a weight of 0 keeps a term in
the logs without letting it shape training. Built-in terms (``so8t.rewards.terms``):
``format``, ``exact_match``, ``eos``, ``length``, ``reward_model``.

``reward.normalize`` and ``reward.clip`` optionally normalise the total by its running
mean and standard deviation and clip it (``so8t.rewards.normalize.RewardNormalizer``).

Reward models
-------------
The built-in ``reward_model`` term scores prompt + completion with an
``AutoModelForSequenceClassification`` (``conf/reward/model.yaml`` is a preset)::

    reward:
      terms:
        format: {weight: 0.2}
        reward_model:
          weight: 1.0
          kwargs:
            path: /models/my-reward-model   # a save_pretrained folder, or a hub id in the local cache
            device: cpu                     # cpu, cuda, cuda:N or auto (cuda when there is one)
            dtype: float32                  # float32, bfloat16 or float16
            batch_size: 8                   # completions per forward pass
            max_length: 1024                # longer texts keep their last max_length tokens
            label_index: 0                  # which logit is the score
            local_files_only: true          # never download
            trust_remote_code: false

Only ``path`` is required. The model is loaded once, when the reward is built; validation
checks the options without loading it. With a chat template on the reward model's tokenizer
and chat messages for the prompt, the model reads its own rendering of the conversation;
otherwise the prompt text followed by the completion (details in
``so8t.rewards.reward_model``). A second reward model is another term with
``_target_: so8t.rewards.reward_model.RewardModelTerm``.

Classes as terms
----------------
A ``_target_`` (or a built-in) that is a class is instantiated once per run with the term's
``kwargs`` as keyword arguments, and the instance is called like a reward function - the
way to keep a model or other expensive state between calls. Validation does not instantiate
it: it checks the kwargs against the constructor's signature, or calls the class's
``check_options(kwargs) -> list[str]`` when it has one (then its messages, and those of the
errors its constructor raises, start with the option's name). A ValueError, SetupError or
ModelNotAvailableError from the constructor refuses the run (exit code 2) naming the term.

Writing a reward function
-------------------------
A reward function is any importable callable, named by its dotted path in ``_target_``.
It is called with keyword arguments only::

    def my_reward(completions, references, **kwargs) -> list[float | None]:
        ...

Arguments it receives (take the ones you need, and always accept ``**kwargs`` so that
arguments added later do not break it):

* ``completions`` – ``list[str]``, the decoded responses, truncated after EOS;
* ``prompts`` – ``list[str]``, the prompt texts, exactly as the policy was given them (after
  its chat template, when it has one);
* ``messages`` – for each prompt its chat messages, a list of ``{"role", "content"}`` dicts
  (system/user turns, no assistant turn), or None (the whole argument) when the prompt
  source has none;
* ``references`` – ``list[str | None]``, the reference answers (None where a prompt has none);
* ``solution`` – the same list as ``references``, under the name TRL's reward functions use;
* ``eos`` – ``list[bool]``, whether each response ended with the EOS token;
* ``num_tokens`` – ``list[int]``, the number of response tokens;
* ``max_new_tokens`` – ``int``, the rollout's response-length limit;
* every key of the term's ``kwargs``.

It returns one float (or None, meaning "no score": it counts as 0 in the total and is left
out of the term's logged mean) per completion. Scores are used as given, unweighted; the
term's ``weight`` scales them.

Functions from ``trl.rewards`` (and anything else under the ``trl`` package) expect
TRL's *conversational* completions, ``[[{"role": "assistant", "content": text}], ...]``:
``think_format_reward`` reads ``completion[0]["content"]`` and fails on plain strings. Terms
whose function lives in ``trl`` therefore receive completions in that shape; all other
terms receive plain strings.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from so8t.errors import ModelNotAvailableError, SetupError
from so8t.rewards.format import ParsedAnswer, parse_answer
from so8t.rewards.terms import BUILTIN_CLASSES, BUILTIN_OPTION_CHECKS, BUILTIN_TERMS, STANDARD_ARGS

log = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_CLASSES",
    "BUILTIN_TERMS",
    "ParsedAnswer",
    "RewardFunction",
    "RewardResult",
    "RewardTerm",
    "build_reward",
    "check_reward_config",
    "parse_answer",
]


@dataclass(frozen=True)
class RewardTerm:
    """One configured term: its function, weight and fixed keyword options."""

    name: str
    fn: Callable[..., Any]
    weight: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    # True for TRL's functions, which want completions as message lists (see module doc).
    conversational: bool = False


@dataclass
class RewardResult:
    """Scores of one batch: the weighted total and each term's unweighted scores."""

    total: list[float]
    per_term: dict[str, list[float | None]]

    def means(self) -> dict[str, float | None]:
        """Mean unweighted score of each term over the completions it scored (for logging).

        None entries are skipped; a term that scored nothing has mean None.
        """
        means: dict[str, float | None] = {}
        for name, scores in self.per_term.items():
            scored = [s for s in scores if s is not None]
            means[name] = sum(scored) / len(scored) if scored else None
        return means


class RewardFunction:
    """The weighted sum of the configured reward terms."""

    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ValueError("a reward needs at least one term")
        self.terms = list(terms)

    @property
    def weights(self) -> dict[str, float]:
        return {term.name: term.weight for term in self.terms}

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.name}={t.weight:g}" for t in self.terms)
        return f"RewardFunction({parts})"

    def __call__(
        self,
        completions: list[str],
        prompts: list[str],
        references: list[str | None],
        eos: list[bool],
        num_tokens: list[int],
        max_new_tokens: int,
        messages: list[list[dict[str, str]] | None] | None = None,
    ) -> RewardResult:
        n = len(completions)
        inputs = {"prompts": prompts, "references": references, "eos": eos, "num_tokens": num_tokens}
        if messages is not None:
            inputs["messages"] = messages
        for arg_name, values in inputs.items():
            if len(values) != n:
                raise ValueError(f"reward: got {n} completions but {len(values)} {arg_name}")
        common = {
            "prompts": list(prompts),
            "messages": None if messages is None else list(messages),
            "references": list(references),
            "solution": list(references),
            "eos": [bool(e) for e in eos],
            "num_tokens": [int(c) for c in num_tokens],
            "max_new_tokens": int(max_new_tokens),
        }
        as_messages = None
        total = [0.0] * n
        per_term: dict[str, list[float | None]] = {}
        for term in self.terms:
            if term.conversational:
                if as_messages is None:
                    as_messages = [[{"role": "assistant", "content": c}] for c in completions]
                term_completions = as_messages
            else:
                term_completions = list(completions)
            raw = term.fn(completions=term_completions, **common, **term.kwargs)
            scores = _checked_scores(term.name, raw, n)
            per_term[term.name] = scores
            for i, score in enumerate(scores):
                if score is not None:
                    total[i] += term.weight * score
        return RewardResult(total=total, per_term=per_term)


def _checked_scores(name: str, raw: Any, n: int) -> list[float | None]:
    """Turn a term's output into a list of n finite floats or None, or say what is wrong."""
    where = f"reward term '{name}'"
    if isinstance(raw, (str, bytes, Mapping)):
        raise TypeError(f"{where} must return a list of floats, got {type(raw).__name__}")
    try:
        values = list(raw)
    except TypeError:
        raise TypeError(f"{where} must return a list of floats, got {type(raw).__name__}") from None
    if len(values) != n:
        raise ValueError(f"{where} returned {len(values)} scores for {n} completions")
    scores: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            scores.append(None)
            continue
        try:
            score = float(value)  # also accepts numpy scalars and 0-d tensors
        except (TypeError, ValueError):
            raise TypeError(f"{where} returned {value!r} at index {i}; expected a float or None") from None
        if not math.isfinite(score):
            raise ValueError(f"{where} returned a non-finite score {score} at index {i}")
        scores.append(score)
    return scores


def _get(node: Any, key: str, default: Any = None) -> Any:
    """Read a key from a DictConfig, a plain dict or a dataclass alike."""
    if isinstance(node, Mapping):
        return node.get(key, default)
    return getattr(node, key, default)


def _plain(value: Any) -> Any:
    """OmegaConf containers become plain dicts/lists, so user functions get ordinary types."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


@dataclass(frozen=True)
class _TermSpec:
    """A checked term before it is built: classes are instantiated only by build_reward."""

    name: str
    key: str
    fn: Callable[..., Any]
    weight: float
    options: dict[str, Any]
    is_class: bool
    conversational: bool


def _missing_options(key: str, term_cfg: Any) -> list[str]:
    """``???`` values in a term's kwargs (a preset's required option left unset)."""
    from omegaconf import OmegaConf

    node = _get(term_cfg, "kwargs")
    if not OmegaConf.is_config(node) or not hasattr(node, "keys"):
        return []
    return [f"{key}.kwargs.{name} must be set (it is ???)" for name in node.keys() if OmegaConf.is_missing(node, name)]


def _resolve_terms(reward_cfg: Any) -> tuple[list[_TermSpec], list[str]]:
    """Check every term and collect a message for each problem, naming its key.

    Nothing is built here: a class term (one that holds a model) is only checked.
    """
    specs: list[_TermSpec] = []
    errors: list[str] = []
    terms_cfg = _get(reward_cfg, "terms") or {}
    if not terms_cfg:
        errors.append("reward.terms is empty: configure at least one reward term")
    for name, term_cfg in terms_cfg.items():
        key = f"reward.terms.{name}"
        before = len(errors)

        weight = _get(term_cfg, "weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            errors.append(f"{key}.weight must be a number, got {weight!r}")
        elif not math.isfinite(weight):
            errors.append(f"{key}.weight must be finite, got {weight}")

        missing = _missing_options(key, term_cfg)
        errors.extend(missing)
        options = _plain(_get(term_cfg, "kwargs")) or {}
        if not isinstance(options, Mapping):
            errors.append(f"{key}.kwargs must be a mapping, got {options!r}")
            options = {}
        options = dict(options)
        for clash in sorted(set(options) & set(STANDARD_ARGS)):
            errors.append(
                f"{key}.kwargs.{clash}: '{clash}' is passed to every term by SO8T and cannot be set"
            )

        target = _get(term_cfg, "_target_")
        fn: Callable[..., Any] | None = None
        if target:
            fn = _load_target(key, str(target), errors)
        elif name in BUILTIN_TERMS:
            fn = BUILTIN_TERMS[name]
            _check_builtin_options(key, name, fn, options, errors)
        elif name in BUILTIN_CLASSES:
            fn = BUILTIN_CLASSES[name]
        else:
            builtins = sorted(BUILTIN_TERMS) + sorted(BUILTIN_CLASSES)
            errors.append(
                f"{key}: unknown built-in reward term '{name}'. Built-in terms: "
                f"{', '.join(builtins)}; or set {key}._target_ to the dotted "
                "path of a reward function"
            )
        is_class = inspect.isclass(fn)
        if is_class and not missing:
            _check_class_options(key, fn, options, errors)
        elif fn is not None and target:
            _check_signature(key, fn, errors)

        if fn is not None and len(errors) == before:
            module = getattr(fn, "__module__", None) or ""
            specs.append(
                _TermSpec(
                    name=str(name),
                    key=key,
                    fn=fn,
                    weight=float(weight),
                    options=options,
                    is_class=is_class,
                    conversational=module == "trl" or module.startswith("trl."),
                )
            )
    return specs, errors


def _load_target(key: str, target: str, errors: list[str]) -> Callable[..., Any] | None:
    # hydra's get_method imports the module and checks the object is callable; any error
    # while importing a user's module is reported here rather than crashing validation.
    from hydra.utils import get_method

    try:
        return get_method(target)
    except Exception as exc:  # noqa: BLE001 - a user's module may raise anything on import
        errors.append(f"{key}._target_: cannot load '{target}': {exc}")
        return None


def _check_signature(key: str, fn: Callable[..., Any], errors: list[str]) -> None:
    """A user function must take ``**kwargs``; a factory (e.g. ``get_soft_overlong_punishment``)
    mistaken for a reward function fails this check instead of failing mid-training."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # some builtins have no signature; let the call decide
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        errors.append(
            f"{key}._target_: {getattr(fn, '__qualname__', fn)!r} does not accept **kwargs; a reward "
            "function is called as fn(completions=..., prompts=..., references=..., **kwargs) "
            "(see so8t.rewards). Factories such as trl.rewards.get_soft_overlong_punishment "
            "return a reward function and cannot be used directly"
        )


def _check_builtin_options(
    key: str, name: str, fn: Callable[..., Any], options: dict, errors: list[str]
) -> None:
    # Built-ins swallow unknown keywords through **kwargs, so a typo like ``start_frac``
    # would be silently ignored; compare against the options they declare instead.
    declared = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in STANDARD_ARGS
    ]
    for option in sorted(set(options) - set(declared) - set(STANDARD_ARGS)):
        known = ", ".join(declared) if declared else "none"
        errors.append(f"{key}.kwargs.{option}: unknown option of built-in term '{name}' (options: {known})")
    check = BUILTIN_OPTION_CHECKS.get(name)
    if check is not None:
        errors.extend(f"{key}.kwargs: {problem}" for problem in check(options))


def _check_class_options(key: str, cls: type, options: dict, errors: list[str]) -> None:
    """Check a class term's kwargs without instantiating it (that may load a model)."""
    check = getattr(cls, "check_options", None)
    if callable(check):
        errors.extend(f"{key}.kwargs.{problem}" for problem in check(options))
    else:
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as exc:
            errors.append(f"{key}.kwargs: {cls.__qualname__} cannot be built with these options: {exc}")
        except ValueError:
            pass  # no signature to compare with; instantiation will tell
    _check_signature(key, cls.__call__, errors)


def _build_term(spec: _TermSpec) -> RewardTerm:
    fn, kwargs = spec.fn, spec.options
    if spec.is_class:
        # Classes with check_options start their messages with the option's name.
        where = f"{spec.key}.kwargs." if callable(getattr(spec.fn, "check_options", None)) else f"{spec.key}: "
        try:
            fn = spec.fn(**spec.options)
        except ModelNotAvailableError as exc:
            raise ModelNotAvailableError(f"{where}{exc}") from exc
        except (SetupError, ValueError) as exc:
            raise SetupError(f"{where}{exc}") from exc
        kwargs = {}  # the options went to the constructor
    return RewardTerm(
        name=spec.name, fn=fn, weight=spec.weight, kwargs=kwargs, conversational=spec.conversational
    )


def check_reward_config(reward_cfg: Any) -> list[str]:
    """Problems with a reward config, without running any term (empty list when fine).

    Imports each ``_target_`` so that a wrong path is reported before any model is built;
    class terms (such as ``reward_model``) are checked, not instantiated.
    """
    return _resolve_terms(reward_cfg)[1]


def build_reward(reward_cfg: Any) -> RewardFunction:
    """Build the weighted reward from ``reward_cfg`` (a DictConfig, dict or RewardConfig).

    Class terms are instantiated here, once, after the whole config was found valid; a model
    that cannot be loaded raises ModelNotAvailableError, other refusals SetupError, each
    naming the term's key.
    """
    specs, errors = _resolve_terms(reward_cfg)
    if errors:
        raise ValueError("invalid reward config:\n  " + "\n  ".join(errors))
    reward = RewardFunction([_build_term(spec) for spec in specs])
    log.info("reward: %s", reward)
    return reward
