"""Reward terms and the weighted reward the PPO loop optimises.

Configuration
-------------
``reward.terms`` maps a term name to a Hydra-instantiable node: its ``weight``, the
``_target_`` that scores (with ``_partial_: true`` for a function) and the term's options
beside them::

    reward:
      terms:
        format: {weight: 0.2}                       # built-in, found by its name
        exact_match: {weight: 1.0}
        length: {weight: 0.1, start_fraction: 0.5}  # a built-in's options, beside its weight
        think: {weight: 0.1, _target_: trl.rewards.think_format_reward, _partial_: true}
        mine: {weight: 1.0, _target_: my_package.rewards.brevity, _partial_: true, limit: 40}

Everything but ``weight`` goes to ``hydra.utils.instantiate``: a function term becomes
``functools.partial(fn, **options)`` (hence ``_partial_: true``: without it Hydra would call the
function once, at build time), called on every batch; a class term is instantiated once with its
options (no ``_partial_``). A term is added from the command line with
``+reward.terms.NAME.weight=0.5`` (a built-in) plus ``+reward.terms.NAME._target_=…`` and
``+reward.terms.NAME._partial_=true`` for a function of one's own.

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
options as keyword arguments, and the instance is called like a reward function - the
way to keep a model or other expensive state between calls. Validation does not instantiate
it: it checks the options against the constructor's signature, or calls the class's
``check_options(options) -> list[str]`` when it has one (then its messages, and those of the
errors its constructor raises, start with the option's name). A ValueError, SetupError or
ModelNotAvailableError from the constructor refuses the run (exit code 2) naming the term.

Writing a reward function
-------------------------
A reward function is any importable callable, named by its dotted path in ``_target_``
(with ``_partial_: true``). It is called with keyword arguments only::

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
* every option of the term (the keys beside ``weight``, ``_target_`` and ``_partial_``).

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
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from so8t.errors import ModelNotAvailableError, SetupError
from so8t.rewards.format import ParsedAnswer, parse_answer
from so8t.rewards.terms import BUILTIN_CLASSES, BUILTIN_OPTION_CHECKS, BUILTIN_TERMS, STANDARD_ARGS
from so8t.targets import HYDRA_KEYS, locate

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
    """One configured term: its function (its options bound, or a built instance) and weight."""

    name: str
    fn: Callable[..., Any]
    weight: float
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
            raw = term.fn(completions=term_completions, **common)
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


# The keys of a term that are not options of its function: the weight, and Hydra's own.
TERM_KEYS = ("weight", *HYDRA_KEYS)


@dataclass(frozen=True)
class _TermSpec:
    """A checked term before it is built: classes are instantiated only by build_reward."""

    name: str
    key: str
    # What hydra.utils.instantiate builds: _target_, _partial_ (functions) and the options.
    node: dict[str, Any]
    weight: float
    is_class: bool
    conversational: bool
    # A class with check_options starts its messages with the option's name.
    names_options: bool


def _path_of(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _term_node(key: str, term_cfg: Any, errors: list[str]) -> DictConfig | None:
    """The term as a DictConfig (a plain dict from a test or a typed conversion becomes one)."""
    if OmegaConf.is_dict(term_cfg):
        return term_cfg
    if isinstance(term_cfg, Mapping):
        return OmegaConf.create(dict(term_cfg))
    if term_cfg is None:  # `reward.terms.NAME: {}` written as `NAME:` in YAML
        return OmegaConf.create({})
    errors.append(f"{key} must be a mapping of weight, _target_, _partial_ and the term's options, got {term_cfg!r}")
    return None


def _resolve_terms(reward_cfg: Any) -> tuple[list[_TermSpec], list[str]]:
    """Check every term and collect a message for each problem, naming its key.

    Nothing is built here: a class term (one that holds a model) is only checked.
    """
    specs: list[_TermSpec] = []
    errors: list[str] = []
    terms_cfg = reward_cfg.terms
    if not terms_cfg:
        errors.append("reward.terms is empty: configure at least one reward term")
        return specs, errors
    for name, raw in terms_cfg.items():
        key = f"reward.terms.{name}"
        before = len(errors)
        term_cfg = _term_node(key, raw, errors)
        if term_cfg is None:
            continue

        weight = term_cfg.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            errors.append(f"{key}.weight must be a number, got {weight!r}")
        elif not math.isfinite(weight):
            errors.append(f"{key}.weight must be finite, got {weight}")

        option_names = [str(k) for k in term_cfg.keys() if str(k) not in TERM_KEYS]
        missing = [f"{key}.{option} must be set (it is ???)" for option in option_names
                   if OmegaConf.is_missing(term_cfg, option)]
        errors.extend(missing)
        # Plain values (no OmegaConf nodes), so checks and user code see ordinary dicts and lists.
        plain = {} if missing else OmegaConf.to_container(term_cfg, resolve=True)
        options = {option: plain[option] for option in option_names} if plain else {}
        for clash in sorted(set(option_names) & set(STANDARD_ARGS)):
            errors.append(f"{key}.{clash}: '{clash}' is passed to every term by SO8T and cannot be set")

        target = term_cfg.get("_target_")
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
                "path of a reward function (with _partial_: true)"
            )
        is_class = inspect.isclass(fn)
        partial = term_cfg.get("_partial_")
        if fn is not None:
            _check_partial(key, str(target or name), is_class, partial, bool(target), errors)
        if is_class and not missing:
            _check_class_options(key, fn, options, errors)
        elif fn is not None and target:
            _check_signature(key, fn, errors)

        if fn is not None and len(errors) == before:
            module = getattr(fn, "__module__", None) or ""
            # A built-in is named by where it is defined; a configured path is kept as written.
            node = {"_target_": str(target) if target else _path_of(fn), **options}
            if not is_class:
                node["_partial_"] = True
            specs.append(
                _TermSpec(
                    name=str(name),
                    key=key,
                    node=node,
                    weight=float(weight),
                    is_class=is_class,
                    conversational=module == "trl" or module.startswith("trl."),
                    names_options=callable(getattr(fn, "check_options", None)),
                )
            )
    return specs, errors


def _check_partial(key: str, what: str, is_class: bool, partial: Any, explicit: bool, errors: list[str]) -> None:
    """A function term is a ``functools.partial`` of its options (``_partial_: true``), called on
    every batch; a class term is built once with its options (no ``_partial_``)."""
    if partial not in (None, True, False):
        errors.append(f"{key}._partial_ must be true or false, got {partial!r}")
    elif is_class and partial:
        errors.append(f"{key}._partial_: {what} is a class, built once per run with its options; "
                      f"remove {key}._partial_")
    elif not is_class and explicit and not partial:
        errors.append(f"{key}._partial_: {what} is a function, called on every batch with its options: "
                      f"set {key}._partial_=true (in YAML, _partial_: true beside _target_)")


def _load_target(key: str, target: str, errors: list[str]) -> Callable[..., Any] | None:
    try:
        fn = locate(target)
    except ImportError as exc:
        errors.append(f"{key}._target_: cannot load '{target}': {exc}")
        return None
    if not callable(fn):
        errors.append(f"{key}._target_: '{target}' is a {type(fn).__name__}, not a function or a class")
        return None
    return fn


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
        errors.append(f"{key}.{option}: unknown option of built-in term '{name}' (options: {known})")
    check = BUILTIN_OPTION_CHECKS.get(name)
    if check is not None:
        errors.extend(f"{key}.{problem}" for problem in check(options))


def _check_class_options(key: str, cls: type, options: dict, errors: list[str]) -> None:
    """Check a class term's options without instantiating it (that may load a model)."""
    check = getattr(cls, "check_options", None)
    if callable(check):
        errors.extend(f"{key}.{problem}" for problem in check(options))
    else:
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as exc:
            errors.append(f"{key}: {cls.__qualname__} cannot be built with these options: {exc}")
        except ValueError:
            pass  # no signature to compare with; instantiation will tell
    _check_signature(key, cls.__call__, errors)


def _build_term(spec: _TermSpec) -> RewardTerm:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    where = f"{spec.key}." if spec.names_options else f"{spec.key}: "
    try:
        # A function becomes functools.partial(fn, **options); a class is instantiated with them.
        # _convert_=all: user code gets plain dicts and lists, not OmegaConf nodes.
        fn = instantiate(spec.node, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ModelNotAvailableError):
            raise ModelNotAvailableError(f"{where}{cause}") from cause
        if isinstance(cause, (SetupError, ValueError, TypeError)):
            raise SetupError(f"{where}{cause}") from cause
        raise
    return RewardTerm(name=spec.name, fn=fn, weight=spec.weight, conversational=spec.conversational)


def check_reward_config(reward_cfg: Any) -> list[str]:
    """Problems with ``reward`` (a RewardConfig node), without running any term (empty when fine).

    Imports each ``_target_`` so that a wrong path is reported before any model is built;
    class terms (such as ``reward_model``) are checked, not instantiated.
    """
    return _resolve_terms(reward_cfg)[1]


def build_reward(reward_cfg: Any) -> RewardFunction:
    """Build the weighted reward from ``reward_cfg`` (a RewardConfig node: ``reward_cfg.terms``).

    Class terms are instantiated here, once, after the whole config was found valid; a model
    that cannot be loaded raises ModelNotAvailableError, other refusals SetupError, each
    naming the term's key.
    """
    specs, errors = _resolve_terms(reward_cfg)
    if errors:
        raise SetupError("invalid reward config:\n  " + "\n  ".join(errors))
    reward = RewardFunction([_build_term(spec) for spec in specs])
    log.info("reward: %s", reward)
    return reward
