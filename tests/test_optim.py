"""The optimizer by ``_target_`` and the LR schedule from transformers, and the checks that run
before any model is loaded (so8t.build.check_config: the reward terms with the config, the
optimizer when the run is built): messages that name the key, exit code 2."""

from __future__ import annotations

import math
import time

import pytest
import torch

from so8t.build import check_config
from so8t.config import CONF_DIR, EXPERIMENTS_DIR
from so8t.config.validate import validate
from so8t.ppo.optim import build_lr_scheduler, build_optimizer
from tests.conftest import compose, run_cli

LR = 3e-3  # the default's, unchanged


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def steps_of(optimizer: torch.optim.Optimizer, weights: list[torch.nn.Parameter], n: int = 3) -> list[torch.Tensor]:
    for i in range(n):
        optimizer.zero_grad()
        sum(((w * (i + 1)) ** 2).sum() for w in weights).backward()
        optimizer.step()
    return [w.detach().clone() for w in weights]


# ------------------------------------------------------------------------------------ optimizer


def test_the_default_is_torch_adamw_with_the_hyperparameters_it_always_had():
    cfg = compose()
    assert dict(cfg.ppo.optimizer) == {"_target_": "torch.optim.AdamW", "lr": LR, "betas": [0.9, 0.999],
                                       "eps": 1e-8, "weight_decay": 0.0}
    built_params, reference_params = params(), params()
    built = build_optimizer(cfg.ppo.optimizer, built_params)
    reference = torch.optim.AdamW(reference_params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert type(built) is torch.optim.AdamW
    assert hyperparameters(built) == hyperparameters(reference)
    assert isinstance(built.param_groups[0]["betas"], tuple)
    for a, b in zip(steps_of(built, built_params), steps_of(reference, reference_params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("overrides, cls, expected", [
    (["ppo/optimizer=sgd", "ppo.optimizer.momentum=0.9"], torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (["ppo.optimizer._target_=torch.optim.SGD", "~ppo.optimizer.betas", "~ppo.optimizer.eps",
      "+ppo.optimizer.momentum=0.5"], torch.optim.SGD, {"lr": LR, "momentum": 0.5}),
    (["ppo/optimizer=adam", "ppo.optimizer.lr=1e-4"], torch.optim.Adam, {"lr": 1e-4, "betas": (0.9, 0.999)}),
    (["ppo.optimizer._target_=torch.optim.Adam", "ppo.optimizer.weight_decay=0.01"], torch.optim.Adam,
     {"lr": LR, "weight_decay": 0.01}),
    (["ppo.optimizer._target_=torch.optim.RMSprop", "~ppo.optimizer.betas", "+ppo.optimizer.alpha=0.9"],
     torch.optim.RMSprop, {"alpha": 0.9, "eps": 1e-8}),
])
def test_any_torch_optimizer_by_preset_or_override(overrides, cls, expected):
    cfg = compose(overrides)
    validate(cfg)
    assert check_config(cfg) == []
    optimizer = build_optimizer(cfg.ppo.optimizer, params())
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert {k: group[k] for k in expected} == expected


@pytest.mark.parametrize("overrides, message", [
    (["ppo.optimizer._target_=torch.optim.NoSuchOptimizer"],
     "ppo.optimizer._target_=torch.optim.NoSuchOptimizer: cannot import it"),
    (["ppo.optimizer._target_=no_such_package.Optim"],
     "ppo.optimizer._target_=no_such_package.Optim: cannot import it"),
    (["ppo.optimizer._target_=torch.nn.Linear"],
     "ppo.optimizer._target_=torch.nn.Linear is not a torch.optim.Optimizer"),
    (["ppo.optimizer._target_=torch.optim.SGD"],
     "ppo.optimizer.betas: SGD takes no argument 'betas' (it takes lr, momentum"),
    (["+ppo.optimizer.learning_rate=1e-3"], "ppo.optimizer.learning_rate: AdamW takes no argument 'learning_rate'"),
    (["ppo.optimizer.lr=-1"], "ppo.optimizer.lr=-1 must be > 0"),
    (["ppo.optimizer.betas=[1.5,0.9]"], "ppo.optimizer: cannot build torch.optim.AdamW"),
    (["+ppo.optimizer._partial_=true"], "ppo.optimizer._partial_: leave it out"),
    (["ppo.scheduler.name=cosine_annealing"], "ppo.scheduler.name='cosine_annealing' is not a transformers schedule"),
    (["ppo.scheduler.name=reduce_lr_on_plateau"], "ppo.scheduler.name=reduce_lr_on_plateau is stepped with a metric"),
    (["ppo.scheduler.num_warmup_steps=5"], "ppo.scheduler.num_warmup_steps=5 has no effect with name=constant"),
    (["ppo.scheduler.name=cosine", "+ppo.scheduler.scheduler_specific_kwargs.cycles=2"],
     "ppo.scheduler: cannot build the cosine schedule with scheduler_specific_kwargs={'cycles': 2}"),
    (["ppo.scheduler.name=cosine_with_min_lr"], "ppo.scheduler: cannot build the cosine_with_min_lr schedule"),
    (["+reward.terms.nonsense.weight=1"], "reward.terms.nonsense: unknown built-in reward term"),
    (["+reward.terms.format.bogus=1"], "reward.terms.format.bogus: unknown option of built-in term 'format'"),
])
def test_a_wrong_optimizer_schedule_or_reward_term_is_found_before_any_model_naming_the_key(overrides, message):
    cfg = compose(overrides)
    validate(cfg)  # well-typed: only the domain checks can tell
    problems = check_config(cfg)
    assert problems and problems[0].startswith(message), problems
    assert len(problems) == (2 if overrides == ["ppo.optimizer._target_=torch.optim.SGD"] else 1)  # betas, eps


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "ppo" / "optimizer").glob("*.yaml")))
def test_every_optimizer_preset_builds(option):
    cfg = compose([f"ppo/optimizer={option}"])
    validate(cfg)
    assert check_config(cfg) == []
    assert type(build_optimizer(cfg.ppo.optimizer, params())).__name__.lower() == option


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_experiment_preset_passes_the_domain_checks(name):
    cfg = compose([f"experiment={name}"])
    assert check_config(cfg) == []


# ------------------------------------------------------------------------------------ schedule


def earlier_multiplier(step: int, kind: str, total_steps: int) -> float:
    """The hand-written schedule this project used before transformers' (no warm-up), kept here
    as the reference the transformers schedules must reproduce."""
    if kind == "constant":
        return 1.0
    progress = min(1.0, step / max(1, total_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rates(name: str, max_steps: int, warmup: int = 0, **extra) -> list[float]:
    cfg = compose([f"ppo.scheduler.name={name}", f"ppo.scheduler.num_warmup_steps={warmup}"])
    cfg.ppo.scheduler.scheduler_specific_kwargs = extra
    optimizer = torch.optim.AdamW(params(), lr=LR)
    scheduler = build_lr_scheduler(optimizer, cfg.ppo.scheduler, max_steps)
    lrs = []
    for _ in range(max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("max_steps", [8, 60, 500])
def test_constant_linear_and_cosine_give_the_learning_rates_of_before(max_steps):
    for kind in ("constant", "cosine"):
        expected = [LR * earlier_multiplier(k, kind, max_steps) for k in range(max_steps)]
        assert learning_rates(kind, max_steps) == expected, kind  # the same bits
    # (T - k) / T against 1 - k / T: equal up to the last bit of the float.
    expected = [LR * earlier_multiplier(k, "linear", max_steps) for k in range(max_steps)]
    assert learning_rates("linear", max_steps) == pytest.approx(expected, rel=1e-15, abs=1e-18)
    assert learning_rates("linear", max_steps)[:2] == [LR, LR * (max_steps - 1) / max_steps]


def test_warm_up_and_the_other_transformers_schedules_over_ppo_updates():
    # transformers' warm-up: update k runs at k / num_warmup_steps of the peak.
    assert learning_rates("constant_with_warmup", 6, warmup=4) == [0.0, LR / 4, LR / 2, LR * 3 / 4, LR, LR]
    lrs = learning_rates("cosine_with_restarts", 20, num_cycles=2)
    assert lrs[0] == LR and lrs[10] == LR and min(lrs) < LR / 10  # two cycles over the run
    assert learning_rates("polynomial", 10, power=1.0, lr_end=0.0) == pytest.approx(learning_rates("linear", 10))


# ------------------------------------------------------------------------------------ the command


@pytest.mark.slow
@pytest.mark.parametrize("override, needle, with_the_config", [
    ("ppo.optimizer._target_=torch.optim.NoSuchOptimizer", "ppo.optimizer._target_=torch.optim.NoSuchOptimizer", False),
    ("ppo.optimizer._target_=torch.optim.SGD", "ppo.optimizer.betas: SGD takes no argument 'betas'", False),
    ("+reward.terms.mine={_target_:no_such_module.reward,_partial_:true}", "reward.terms.mine._target_", True),
])
def test_the_command_refuses_a_wrong_target_with_exit_2_before_loading_a_model(tmp_path, override, needle,
                                                                               with_the_config):
    started = time.monotonic()
    proc = run_cli(tmp_path, override, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert needle in proc.stdout and "Traceback" not in proc.stdout
    assert time.monotonic() - started < 30
    # No model was loaded (build_components logs the policy once it is built), nothing was saved.
    assert "trainable parameters" not in proc.stdout and not list(tmp_path.glob("outputs/**/checkpoints"))
    # Reward terms are refused with the config, before the run starts; the optimizer when the
    # run is set up, before anything is built.
    assert ("run dir:" in proc.stdout) is not with_the_config


@pytest.mark.slow
def test_the_command_trains_with_sgd_and_a_cosine_warm_up(tmp_path):
    proc = run_cli(tmp_path, "ppo/optimizer=sgd", "ppo.optimizer.momentum=0.9", "ppo.scheduler.name=cosine",
                   "ppo.scheduler.num_warmup_steps=1", "max_steps=3", "ppo.rollout_batch_size=8",
                   "ppo.ppo_epochs=1", "run_name=sgd", timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:]
    import json

    rows = [json.loads(line) for line in
            (tmp_path / "outputs/default/runs/sgd/metrics.jsonl").read_text().splitlines()]
    lrs = [row["optim/lr"] for row in rows]
    # Warm-up update 0 at 0, then the cosine from the peak over the 2 updates left.
    assert lrs == pytest.approx([0.0, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 2))])
