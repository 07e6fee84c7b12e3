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
import torch
from hydra import compose, initialize_config_dir

from so8t.build import build_components
from so8t.checkpoint import DEFAULT_SHAPE_KEYS, CheckpointError, CheckpointService
from so8t.checkpoint.identity import compare_identity
from so8t.config import CONF_DIR, register
from so8t.config.identity import config_identity
from so8t.config.validate import validate
from so8t.ppo.optim import build_lr_scheduler
from so8t.resume_config import RESUME_SHAPE_KEYS, capture_hyperparameters, reapply_hyperparameters

SHAPE_KEYS = (*DEFAULT_SHAPE_KEYS, *RESUME_SHAPE_KEYS)
STRING_ALTERNATIVES = {"constant": "linear", "linear": "cosine", "cosine": "linear", "fixed": "adaptive",
                       "adaptive": "fixed", "torch.optim.AdamW": "torch.optim.Adam"}


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


def schedule_at(cfg, step: int) -> float:
    """The LR the config's schedule gives at ``step``, from a scheduler of its own."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.ppo.optimizer["lr"])
    scheduler = build_lr_scheduler(optimizer, cfg.ppo.scheduler, cfg.max_steps)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def settings(trainer, cfg) -> dict:
    """What the trainer will use from its config, the LR evaluated at its current step."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in trainer.optimizer.param_groups]
    expected_lr = schedule_at(cfg, trainer.lr_scheduler.last_epoch)
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
    for key in ("ppo.optimizer.lr", "ppo.optimizer.betas", "ppo.optimizer.eps",
                "ppo.optimizer.weight_decay", "ppo.scheduler.name", "ppo.scheduler.num_warmup_steps",
                "ppo.kl.init_coef", "ppo.clip_range"):
        assert key in keys


@pytest.mark.parametrize("key, value", ACCEPTED, ids=[k for k, _ in ACCEPTED])
def test_an_accepted_change_applies_after_the_state_is_loaded(saved, tmp_path, key, value, caplog):
    cfg, run_dir = saved
    new_cfg = with_value(cfg, key, value)
    if key == "ppo.scheduler.num_warmup_steps":
        new_cfg.ppo.scheduler.name = "constant_with_warmup"  # the default constant takes no warm-up
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
    cfg = compose_cfg("ppo.scheduler.name=linear", "max_steps=8")
    save_after(cfg, tmp_path, 4)  # LR at step 4 of 8: half the peak
    longer = copy.deepcopy(cfg)
    longer.max_steps = 16
    trainer, _, _ = resume(longer, tmp_path)
    peak = cfg.ppo.optimizer["lr"]
    # The curve of a run started with max_steps=16, at step 4: 1 - 4/16 of the peak.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * (1 - 4 / 16), rel=1e-12)
    trainer.lr_scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * (1 - 5 / 16), rel=1e-12)


def test_a_changed_optimizer_class_is_refused(saved):
    cfg, run_dir = saved
    new_cfg = copy.deepcopy(cfg)
    new_cfg.ppo.optimizer["_target_"] = "torch.optim.Adam"
    with pytest.raises(CheckpointError, match="ppo.optimizer._target_: checkpoint 'torch.optim.AdamW' -> now "
                                              "'torch.optim.Adam'"):
        resume(new_cfg, run_dir)


def test_a_resume_on_a_warm_up_and_cosine_schedule_is_bit_exact(tmp_path):
    cfg = compose_cfg("ppo.scheduler.name=cosine", "ppo.scheduler.num_warmup_steps=2", "max_steps=5",
                      "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1")
    straight = build_components(cfg).trainer
    expected = [straight.train_step() for _ in range(5)]
    save_after(cfg, tmp_path, 3)  # warm-up done, one update into the cosine
    trainer, _, result = resume(cfg, tmp_path)
    assert result.step == 3 and result.changed_keys == []
    rows = [trainer.train_step() for _ in range(2)]
    keys = ("optim/lr", "loss/total", "reward/mean", "kl/mean")
    assert [[row[k] for k in keys] for row in rows] == [[row[k] for k in keys] for row in expected[3:]]
    assert [row["optim/lr"] for row in expected][:3] == [0.0, cfg.ppo.optimizer["lr"] / 2, cfg.ppo.optimizer["lr"]]
    for a, b in zip(trainer.policy.trainable_parameters(), straight.policy.trainable_parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(trainer.optimizer.state.values(), straight.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()


def earlier_identity(cfg) -> dict:
    """The identity the earlier config layout recorded for this config (optimizer learning_rate and
    schedule under ppo.optimizer, reward options under kwargs)."""
    identity = config_identity(cfg)
    identity.pop("ppo.optimizer._target_")
    identity["ppo.optimizer.learning_rate"] = identity.pop("ppo.optimizer.lr")
    identity["ppo.optimizer.lr_schedule"] = identity.pop("ppo.scheduler.name")
    identity["ppo.optimizer.warmup_steps"] = identity.pop("ppo.scheduler.num_warmup_steps")
    identity.pop("ppo.scheduler.scheduler_specific_kwargs", None)  # an empty dict flattens to nothing
    identity["reward.terms.length.kwargs.start_fraction"] = 0.5
    return identity


def test_a_checkpoint_of_the_earlier_config_layout_is_refused_saying_what_to_do(tmp_path):
    from so8t.resume_config import earlier_layout_refusal

    cfg = compose_cfg("max_steps=2")
    trainer = build_components(cfg).trainer
    old = CheckpointService(tmp_path, cfg.checkpoint, trainer.stateful_parts(), earlier_identity(cfg),
                            shape_keys=SHAPE_KEYS)
    old.resume("auto")
    trainer.train_step()
    old.save_now(1, "manual")
    old.close()
    assert earlier_layout_refusal(config_identity(cfg)) is None
    service = CheckpointService(tmp_path, cfg.checkpoint, trainer.stateful_parts(), config_identity(cfg),
                                shape_keys=SHAPE_KEYS, refuse_identity=earlier_layout_refusal)
    with pytest.raises(CheckpointError) as info:
        service.resume("auto")
    message = str(info.value)
    assert "written with the earlier config layout (ppo.optimizer.learning_rate, ppo.optimizer.lr_schedule" in message
    assert "ppo.optimizer.lr, not learning_rate" in message and "reward.terms.NAME.kwargs.OPTION" in message
    assert "another run_name" in message


@pytest.mark.slow
def test_the_command_refuses_an_earlier_layout_run_folder_with_exit_2(tmp_path):
    from tests.conftest import run_cli

    cfg = compose_cfg("max_steps=2")
    run_dir = tmp_path / "outputs" / "default" / "runs" / "earlier"
    trainer = build_components(cfg).trainer
    old = CheckpointService(run_dir, cfg.checkpoint, trainer.stateful_parts(), earlier_identity(cfg),
                            shape_keys=SHAPE_KEYS)
    old.resume("auto")
    trainer.train_step()
    old.save_now(1, "manual")
    old.close()
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    proc = run_cli(tmp_path, "run_name=earlier", "max_steps=2", timeout=180)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "written with the earlier config layout" in proc.stdout and "Traceback" not in proc.stdout
    # Nothing of the run is lost: its checkpoint is where it was.
    assert all((run_dir / p).exists() for p in before)
