"""The optimizer and its learning-rate schedule, from ``ppo.optimizer`` and ``ppo.scheduler``.

The optimizer is any ``torch.optim`` class, named by ``ppo.optimizer._target_`` with its
arguments beside it under torch's own names, and built by ``hydra.utils.instantiate`` with the
trainable parameters. The schedule is ``transformers.get_scheduler`` (its ``SchedulerType``
names), stepped once per PPO update over ``max_steps`` updates; every schedule it offers that
needs no metric is a ``LambdaLR``, whose position (``last_epoch``) is checkpointed, so a resumed
run continues on the same curve.

:func:`check_optimizer_config` and :func:`check_scheduler_config` find what would fail while
building, before any model is loaded: they import the class, compare the arguments with its
signature and build both once over a one-element dummy parameter (torch checks the values then,
e.g. a negative ``lr``). The messages name the config key.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

from so8t.errors import SetupError
from so8t.targets import call_arguments, locate

OPTIMIZER_KEY = "ppo.optimizer"
SCHEDULER_KEY = "ppo.scheduler"
# Schedules whose step() wants a metric (or that are no LambdaLR): the trainer steps without one.
UNSUPPORTED_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def _dummy_parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1))]


def check_optimizer_config(opt_cfg: Any) -> list[str]:
    """Problems with ``ppo.optimizer`` (empty when an optimizer can be built from it)."""
    if not isinstance(opt_cfg, Mapping) and not hasattr(opt_cfg, "items"):
        return [f"{OPTIMIZER_KEY} must be a mapping with a _target_ (e.g. ppo/optimizer=adamw), got {opt_cfg!r}"]
    target = opt_cfg.get("_target_")
    if not target or not isinstance(target, str):
        return [f"{OPTIMIZER_KEY}._target_ must name a torch.optim class (e.g. torch.optim.AdamW), got {target!r}"]
    try:
        cls = locate(target)
    except ImportError as exc:
        return [f"{OPTIMIZER_KEY}._target_={target}: cannot import it: {exc}"]
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        return [f"{OPTIMIZER_KEY}._target_={target} is not a torch.optim.Optimizer class"]
    if opt_cfg.get("_partial_"):
        return [f"{OPTIMIZER_KEY}._partial_: leave it out; the optimizer is built with the trainable parameters"]
    arguments = call_arguments(opt_cfg)
    problems = []
    if "params" in arguments:
        problems.append(f"{OPTIMIZER_KEY}.params is set by SO8T (the trainable parameters); remove it")
        arguments.pop("params")
    signature = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in signature if p.name != "params" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature)  # the dummy build decides
    for name in [] if takes_any else sorted(set(arguments) - set(accepted)):
        problems.append(f"{OPTIMIZER_KEY}.{name}: {cls.__name__} takes no argument {name!r} "
                        f"(it takes {', '.join(accepted)}; drop it with ~{OPTIMIZER_KEY}.{name})")
    lr = arguments.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not (math.isfinite(lr) and lr > 0):
        problems.append(f"{OPTIMIZER_KEY}.lr={lr} must be > 0")
    if problems:
        return problems
    try:
        build_optimizer(opt_cfg, _dummy_parameters())
    except SetupError as exc:
        return [str(exc)]
    return []


def build_optimizer(opt_cfg: Any, params) -> torch.optim.Optimizer:
    """``hydra.utils.instantiate(ppo.optimizer, params=params)``; SetupError naming the key on failure."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    overrides: dict[str, Any] = {}
    if isinstance(opt_cfg.get("betas"), (list, tuple)) or OmegaConf.is_list(opt_cfg.get("betas")):
        # YAML has no tuples; torch documents betas as one and keeps it as given in the param groups
        # (and so in checkpoints), as the optimizer always had it.
        overrides["betas"] = tuple(opt_cfg.get("betas"))
    try:
        # _convert_=all: the class gets plain lists and dicts, not OmegaConf nodes.
        optimizer = instantiate(opt_cfg, params=params, _convert_="all", **overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the class's own TypeError/ValueError
        cause = exc.__cause__ or exc
        raise SetupError(f"{OPTIMIZER_KEY}: cannot build {opt_cfg.get('_target_')} from "
                         f"{dict(call_arguments(opt_cfg))}: {type(cause).__name__}: {cause}") from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SetupError(f"{OPTIMIZER_KEY}._target_={opt_cfg.get('_target_')} built a "
                         f"{type(optimizer).__name__}, not a torch.optim.Optimizer")
    return optimizer


def check_scheduler_config(sched_cfg: Any, max_steps: int) -> list[str]:
    """Problems with ``ppo.scheduler`` (empty when a schedule can be built from it)."""
    from transformers import SchedulerType

    names = [t.value for t in SchedulerType if t.value not in UNSUPPORTED_SCHEDULES]
    name = sched_cfg.name
    if name in UNSUPPORTED_SCHEDULES:
        return [f"{SCHEDULER_KEY}.name={name} is stepped with a metric, which the PPO loop does not give; "
                f"choose one of {names}"]
    if name not in names:
        return [f"{SCHEDULER_KEY}.name={name!r} is not a transformers schedule; choose one of {names}"]
    warmup = sched_cfg.num_warmup_steps
    if warmup < 0:
        return [f"{SCHEDULER_KEY}.num_warmup_steps={warmup} must be >= 0"]
    if name == "constant" and warmup > 0:
        return [f"{SCHEDULER_KEY}.num_warmup_steps={warmup} has no effect with name=constant; "
                f"use {SCHEDULER_KEY}.name=constant_with_warmup"]
    optimizer = torch.optim.SGD(_dummy_parameters(), lr=1.0)
    try:
        build_lr_scheduler(optimizer, sched_cfg, max_steps)
    except SetupError as exc:
        return [str(exc)]
    return []


def build_lr_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Any,
                       max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``transformers.get_scheduler`` over ``max_steps`` PPO updates; SetupError naming the key on failure."""
    from omegaconf import OmegaConf
    from transformers import get_scheduler

    extra = sched_cfg.scheduler_specific_kwargs
    extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra or {})
    try:
        scheduler = get_scheduler(str(sched_cfg.name), optimizer, num_warmup_steps=int(sched_cfg.num_warmup_steps),
                                  num_training_steps=int(max_steps), scheduler_specific_kwargs=extra)
    except (TypeError, ValueError) as exc:  # an argument the schedule does not take, a bad value
        raise SetupError(f"{SCHEDULER_KEY}: cannot build the {sched_cfg.name} schedule with "
                         f"scheduler_specific_kwargs={extra}: {exc}") from exc
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise SetupError(f"{SCHEDULER_KEY}.name={sched_cfg.name} is not a LambdaLR schedule, which a resume "
                         "re-evaluates at its restored step")
    return scheduler
