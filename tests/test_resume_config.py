"""A config change that resume accepts really applies after the checkpoint's state is loaded.

For every result-shaping key of the default config the resume check does not refuse, the test
changes it, resumes a checkpoint written with the old value, and compares what the trainer will
use from now on with what a fresh build from the new config uses: the optimizer's
hyperparameters, the scheduler's base learning rates and the LR of the next update, a fixed KL
coefficient, the PPO settings, the sampler's batch size. Either they match, or the resume is
refused with a CheckpointError; an accepted change that is silently undone fails.
"""

from __future__ import annotations

import copy
import logging

import pytest
from hydra import compose, initialize_config_dir

from so8t.build import build_components
from so8t.checkpoint import DEFAULT_SHAPE_KEYS, CheckpointError, CheckpointService
from so8t.checkpoint.identity import compare_identity
from so8t.config import CONF_DIR, register
from so8t.config.identity import config_identity
from so8t.config.validate import validate
from so8t.ppo.schedules import lr_multiplier
from so8t.resume_config import RESUME_SHAPE_KEYS, capture_hyperparameters, reapply_hyperparameters

SHAPE_KEYS = (*DEFAULT_SHAPE_KEYS, *RESUME_SHAPE_KEYS)
STRING_ALTERNATIVES = {"constant": "linear", "linear": "cosine", "cosine": "linear", "fixed": "adaptive",
                       "adaptive": "fixed"}


def compose_cfg(*overrides: str):
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return validate(compose("train", overrides=["output.progress_bars=false", "hardware.num_threads=1",
                                                    *overrides]))


def save_after(cfg, run_dir, steps: int):
    components = build_components(cfg)
    trainer = components.trainer
    service = CheckpointService(run_dir, cfg.checkpoint, trainer.stateful_parts(), config_identity(cfg),
                                shape_keys=SHAPE_KEYS)
    service.resume("auto")
    for _ in range(steps):
        trainer.train_step()
    service.save_now(trainer.counters.step, "manual")
    service.close()
    return trainer


def resume(cfg, run_dir):
    """Build from ``cfg`` and resume ``run_dir`` as the recipe does; (trainer, fresh, result)."""
    trainer = build_components(cfg).trainer
    service = CheckpointService(run_dir, cfg.checkpoint, trainer.stateful_parts(), config_identity(cfg),
                                shape_keys=SHAPE_KEYS)
    fresh = capture_hyperparameters(trainer)
    surfaces = settings(trainer, cfg)
    result = service.resume("auto")
    reapply_hyperparameters(trainer, fresh, cfg.ppo.kl.kind, result.changed_keys)
    return trainer, surfaces, result


def settings(trainer, cfg) -> dict:
    """What the trainer will use from its config, the LR evaluated at its current step."""
    opt = cfg.ppo.optimizer
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in trainer.optimizer.param_groups]
    step = trainer.lr_scheduler.last_epoch
    expected_lr = opt.learning_rate * lr_multiplier(step, opt.lr_schedule, opt.warmup_steps, cfg.max_steps)
    out = {
        "groups": copy.deepcopy(groups),
        "base_lrs": list(trainer.lr_scheduler.base_lrs),
        "lr_matches_schedule": all(g["lr"] == expected_lr for g in trainer.optimizer.param_groups),
        "ppo": copy.deepcopy(trainer.cfg) if isinstance(trainer.cfg, dict) else repr(trainer.cfg),
        "sampler_batch": trainer.sampler.batch_size,
    }
    if cfg.ppo.kl.kind == "fixed":
        out["kl"] = trainer.kl_controller.value
    return out


def changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.01
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return [v * 0.9 for v in value]
    if isinstance(value, str):
        return STRING_ALTERNATIVES.get(value)
    return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = compose_cfg()
    run_dir = tmp_path_factory.mktemp("resume-config")
    save_after(cfg, run_dir, 2)
    return cfg, run_dir


def accepted_keys():
    cfg = compose_cfg()
    identity = config_identity(cfg)
    keys = []
    for key, value in identity.items():
        new = changed_value(value)
        if new is None:
            continue
        refused, _ = compare_identity(identity, {**identity, key: new}, SHAPE_KEYS)
        if not refused:
            keys.append((key, new))
    return keys


ACCEPTED = accepted_keys()


def with_value(cfg, key: str, value):
    """A copy of the typed config with the dotted ``key`` set to ``value``."""
    new = copy.deepcopy(cfg)
    *path, last = key.split(".")
    node = new
    for part in path:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if isinstance(node, dict):
        node[last] = value
    else:
        setattr(node, last, value)
    return new


def test_the_list_of_accepted_keys_covers_the_optimizer_schedule_kl_and_ppo_settings():
    keys = {k for k, _ in ACCEPTED}
    for key in ("ppo.optimizer.learning_rate", "ppo.optimizer.betas", "ppo.optimizer.eps",
                "ppo.optimizer.weight_decay", "ppo.optimizer.lr_schedule", "ppo.kl.init_coef", "ppo.clip_range"):
        assert key in keys


@pytest.mark.parametrize("key, value", ACCEPTED, ids=[k for k, _ in ACCEPTED])
def test_an_accepted_change_applies_after_the_state_is_loaded(saved, tmp_path, key, value, caplog):
    cfg, run_dir = saved
    new_cfg = with_value(cfg, key, value)
    try:
        with caplog.at_level(logging.WARNING):
            trainer, fresh, result = resume(new_cfg, run_dir)
    except CheckpointError:
        return  # refused clearly: allowed (the prompt set changed size, say)
    assert key in result.changed_keys and "accepted" in caplog.text
    after = settings(trainer, new_cfg)
    fresh["lr_matches_schedule"] = True  # a fresh build is at step 0; the resumed one must match too
    assert after == fresh, f"{key}={value!r} was accepted but the restored state undid it"


def test_without_changes_the_resumed_hyperparameters_are_the_saved_ones_bit_for_bit(saved):
    cfg, run_dir = saved
    original = build_components(cfg).trainer
    service = CheckpointService(run_dir, cfg.checkpoint, original.stateful_parts(), config_identity(cfg),
                                shape_keys=SHAPE_KEYS)
    service.resume("auto")  # plain load, no reapply: what the checkpoint holds
    loaded = [dict(g, params=None) for g in original.optimizer.param_groups]
    trainer, _, _ = resume(cfg, run_dir)
    assert [dict(g, params=None) for g in trainer.optimizer.param_groups] == loaded
    assert trainer.lr_scheduler.get_last_lr() == original.lr_scheduler.get_last_lr()


def test_a_changed_seed_is_refused(saved):
    cfg, run_dir = saved
    new_cfg = copy.deepcopy(cfg)
    new_cfg.seed = 7
    with pytest.raises(CheckpointError, match="seed: checkpoint 0 -> now 7"):
        resume(new_cfg, run_dir)


def test_a_longer_max_steps_restretches_a_decaying_schedule(tmp_path):
    cfg = compose_cfg("ppo.optimizer.lr_schedule=linear", "max_steps=8")
    save_after(cfg, tmp_path, 4)  # LR at step 4 of 8: half the peak
    longer = copy.deepcopy(cfg)
    longer.max_steps = 16
    trainer, _, _ = resume(longer, tmp_path)
    peak = cfg.ppo.optimizer.learning_rate
    # The curve of a run started with max_steps=16, at step 4: 1 - 4/16 of the peak.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * (1 - 4 / 16), rel=1e-12)
    trainer.lr_scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * (1 - 5 / 16), rel=1e-12)
