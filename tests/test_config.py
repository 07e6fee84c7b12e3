"""Every config option and preset composes and validates; bad input names its key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from so8t.config import CONF_DIR, EXPERIMENTS_DIR, register
from so8t.config.identity import config_identity, is_neutral, name_from_overrides, safe_name
from so8t.config.validate import ConfigValidationError, validate
from tests.conftest import compose

register()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OPTIONS = [
    (group, option)
    for group in ("model", "adapter", "ppo", "reward", "data", "checkpoint", "hardware", "output", "logger", "paths",
                  "debug")
    for option in _options(group)
]
# Options that need a value the user must supply before they validate.
REQUIRED = {("model", "local"): ["model.path=/some/folder"], ("data", "jsonl"): ["data.path=prompts.jsonl"],
            ("reward", "model"): ["reward.terms.reward_model.kwargs.path=/some/folder"]}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    validate(cfg)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_experiment_preset_composes_validates_and_starts_with_its_command(name):
    cfg = compose([f"experiment={name}"])
    validate(cfg)
    first_line = (EXPERIMENTS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line == f"# so8t-train experiment={name}"


def test_phi35_preset_selects_the_real_model_and_the_3060_profile():
    cfg = compose(["experiment=phi35_rtx3060"])
    assert cfg.model.path == "microsoft/Phi-3.5-mini-instruct"
    assert cfg.hardware.device == "cuda" and cfg.hardware.dtype == "bfloat16"
    assert cfg.hardware.micro_batch_size == 1 and cfg.hardware.gradient_checkpointing


def test_hardware_profiles_change_only_device_and_memory_knobs():
    cpu = config_identity(compose(["hardware=cpu"]))
    gpu = config_identity(compose(["hardware=rtx3060"]))
    assert cpu == gpu


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.does_not_exist=1", "model.does_not_exist"),
        ("ppo.nope=3", "ppo.nope"),
        ("ppo.temperature=hot", "ppo.temperature"),
        ("max_steps=many", "max_steps"),
        ("adapter=nope", "adapter/nope"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition_naming_the_key(override, needle):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    text = str(info.value) + str(info.value.__cause__ or "")
    assert needle in text


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["ppo.temperature=-1"], "ppo.temperature"),
        (["ppo.temperature=0"], "ppo.temperature"),
        (["ppo.mini_batch_size=5"], "ppo.mini_batch_size"),
        (["hardware.micro_batch_size=3"], "hardware.micro_batch_size"),
        (["ppo.gamma=1.5"], "ppo.gamma"),
        (["ppo.kl.kind=magic"], "ppo.kl.kind"),
        (["+reward.terms.nonsense.weight=1"], "reward.terms.nonsense"),
        (["+reward.terms.format.bogus=1"], "reward.terms.format.bogus"),
        (["+model.bogus=1"], "model.bogus"),
        (["+adapter.bogus=1"], "adapter.bogus"),
        (["+adapter.gate.bogus=1"], "adapter.gate.bogus"),
        (["adapter.gate.kind=sigmoid", "adapter.gate.steps=0"], "adapter.gate.steps"),
        (["data.max_operand=-1"], "data.max_operand"),
        (["hardware.device=tpu"], "hardware.device"),
        (["checkpoint.cadence=sometimes"], "checkpoint.cadence"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["max_steps=0"], "max_steps"),
        (["model=local"], "model.path"),
        (["data=jsonl"], "data.path"),
    ],
)
def test_bad_values_fail_validation_naming_the_key(overrides, needle):
    cfg = compose(overrides)
    with pytest.raises(ConfigValidationError) as info:
        validate(cfg)
    assert needle in str(info.value)


def test_validation_reports_every_problem_at_once():
    cfg = compose(["ppo.temperature=-1", "ppo.mini_batch_size=5"])
    with pytest.raises(ConfigValidationError) as info:
        validate(cfg)
    assert len(info.value.problems) == 2


def test_user_reward_term_with_target_validates():
    cfg = compose(["+reward.terms.think={weight:0.5,_target_:trl.rewards.think_format_reward}"])
    validate(cfg)
    assert cfg.reward.terms.think.weight == 0.5


def test_run_name_ignores_order_and_result_neutral_keys():
    a = name_from_overrides(["seed=2", "ppo.optimizer.learning_rate=1e-5", "hardware=rtx3060", "max_steps=9"])
    b = name_from_overrides(["ppo.optimizer.learning_rate=1e-5", "checkpoint.every_seconds=5", "seed=2"])
    assert a == b == "ppo.optimizer.learning_rate=1e-5,seed=2"
    assert name_from_overrides([]) == "default"
    assert name_from_overrides(["max_steps=3", "output.samples_every=3", "checkpoint=time"]) == "default"


def test_run_names_are_file_system_safe_and_hashed_when_long():
    name = name_from_overrides(["data.path=/data/x y/prompts.jsonl", "data=jsonl"])
    assert "/" not in name and " " not in name and "\\" not in name
    long = name_from_overrides([f"ppo.k{i}=value{i}" for i in range(40)])
    other = name_from_overrides([f"ppo.k{i}=value{i}" for i in range(41)])
    assert len(long) <= 80 and len(other) <= 80 and long != other
    assert safe_name("a:b*c?d.") == "a_b_c_d"


def test_neutral_keys_cover_hardware_logging_cadence_and_length():
    for key in ("hardware", "hardware.num_threads", "output.samples_every", "logger.backends", "checkpoint.every_steps",
                "max_steps", "+max_steps"):
        assert is_neutral(key)
    for key in ("seed", "ppo.temperature", "model.path", "adapter.layers"):
        assert not is_neutral(key)


def test_identity_is_flat_and_excludes_neutral_keys():
    identity = config_identity(compose())
    assert identity["model.kind"] == "tiny"
    assert "ppo.optimizer.learning_rate" in identity
    assert not any(k.startswith(("hardware", "checkpoint", "output", "logger")) for k in identity)
    assert "max_steps" not in identity and "run_name" not in identity
    assert not any(isinstance(v, dict) for v in identity.values())
    # A result-shaping change shows in the identity; result-neutral ones do not.
    assert config_identity(compose(["seed=1"])) == {**identity, "seed": 1}
    assert config_identity(compose(["max_steps=7", "hardware.num_threads=1", "logger=tensorboard"])) == identity


@pytest.mark.slow
def test_help_names_the_command_describes_every_group_and_hides_the_schemas():
    import subprocess
    import sys

    from so8t.config.help import GROUPS

    folders = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")}
    assert set(GROUPS) == folders | {"experiment"}, "every config group needs a line in --help"
    out = subprocess.run([sys.executable, "-m", "so8t.train", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("so8t-train: ") and "train is powered by Hydra" not in text
    assert "_schema" not in text
    for group, what in GROUPS.items():
        assert f"  {group}" in text and what in text, group
    assert "options: lora, so8" in text and "options: all, default, mlflow, tensorboard, wandb" in text
    assert "optimized_metric: reward/mean" in text  # the composed config follows


def test_own_presets_on_hydra_searchpath_add_options_to_the_groups(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nppo:\n  clip_range: 0.33\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_phi.yaml").write_text("defaults:\n  - local\n  - _self_\npath: /models/my_phi\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine", "model=my_phi"])
    validate(cfg)
    assert cfg.ppo.clip_range == 0.33 and cfg.model.kind == "local" and cfg.model.path == "/models/my_phi"
