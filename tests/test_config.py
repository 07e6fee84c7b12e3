"""Every config option and preset composes and validates; bad input names its key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from so8t.config import CONF_DIR, EXPERIMENTS_DIR, register
from so8t.config.help import options_of
from so8t.config.identity import config_identity, is_neutral, name_from_overrides, safe_name
from so8t.config.validate import ConfigValidationError, validate
from tests.conftest import compose

register()


def _options(group: str) -> list[str]:
    return options_of(CONF_DIR / group)


GROUP_OPTIONS = [
    (group, option)
    for group in ("model", "adapter", "ppo", "reward", "data", "checkpoint", "hardware", "output", "logger", "paths",
                  "debug")
    for option in _options(group)
]
# Options that need a value the user must supply before they validate.
REQUIRED = {("model", "local"): ["model.path=/some/folder"], ("data", "jsonl"): ["data.path=prompts.jsonl"],
            ("reward", "model"): ["reward.terms.reward_model.path=/some/folder"]}


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
        ("ppo.kl.kind=magic", "ppo.kl.kind"),
        ("checkpoint.cadence=sometimes", "checkpoint.cadence"),
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
        (["+model.bogus=1"], "model.bogus"),
        (["+adapter.bogus=1"], "adapter.bogus"),
        (["+adapter.gate.bogus=1"], "adapter.gate.bogus"),
        (["adapter.gate.kind=sigmoid", "adapter.gate.steps=0"], "adapter.gate.steps"),
        (["data.max_operand=-1"], "data.max_operand"),
        (["hardware.device=tpu"], "hardware.device"),
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
    from so8t.build import check_config

    cfg = compose(["+reward.terms.think={weight:0.5,_target_:trl.rewards.think_format_reward,_partial_:true}"])
    validate(cfg)
    assert check_config(cfg) == []
    assert cfg.reward.terms.think.weight == 0.5


def test_run_name_ignores_order_and_result_neutral_keys():
    a = name_from_overrides(["seed=2", "ppo.optimizer.lr=1e-5", "hardware=rtx3060", "max_steps=9"])
    b = name_from_overrides(["ppo.optimizer.lr=1e-5", "checkpoint.every_seconds=5", "seed=2"])
    assert a == b == "ppo.optimizer.lr=1e-5,seed=2"
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
    assert identity["ppo.optimizer._target_"] == "torch.optim.AdamW" and "ppo.optimizer.lr" in identity
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


# ---------------------------------------------------------------------- one place per fact


def _schema_fields(cls, prefix=""):
    """(dotted key, dataclasses.Field, type) of every leaf field of a schema dataclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def _group_schemas():
    from so8t.config.typed import GROUP_SCHEMAS

    for group, found in GROUP_SCHEMAS.items():
        for kind, cls in (found.items() if isinstance(found, dict) else [(None, found)]):
            option = {"adapter": kind, "data": kind}.get(group)
            yield group, option, cls


def _choice_fields():
    import enum
    import typing

    for group, option, cls in _group_schemas():
        for key, _, tp in _schema_fields(cls):
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if isinstance(args[0], type) and issubclass(args[0], enum.Enum):
                yield group, option, key, [m.value for m in args[0]]


CHOICES = list(_choice_fields())


@pytest.mark.parametrize("group,option,key,choices", CHOICES, ids=[f"{g}.{k}" for g, _, k, _ in CHOICES])
def test_a_value_outside_a_choice_fails_at_composition_naming_the_key_and_the_choices(group, option, key, choices):
    picked = [f"{group}={option}"] if option else []
    value = "[bogus]" if key == "backends" else "bogus"
    with pytest.raises(ConfigCompositionException) as info:
        compose([*picked, f"{group}.{key}={value}"])
    text = str(info.value) + str(info.value.__cause__ or "")
    assert f"{group}.{key}" in text and "bogus" in text
    assert f"expected one of [{', '.join(choices)}]" in text


def _ranged_fields():
    from so8t.config.schema import TrainConfig

    for group, option, cls in _group_schemas():
        for key, f, _ in _schema_fields(cls):
            if "range" in f.metadata:
                yield group, option, f"{group}.{key}", f.metadata["range"]
    for key, f, _ in _schema_fields(TrainConfig):
        if "." not in key and "range" in f.metadata:
            yield None, None, key, f.metadata["range"]


RANGED = list(_ranged_fields())


@pytest.mark.parametrize("group,option,key,valid", RANGED, ids=[k for _, _, k, _ in RANGED])
def test_each_range_beside_its_field_is_checked(group, option, key, valid):
    """Every ``ranged(...)`` field of the schema refuses a value just outside its range, and the
    message states the range: the one generic check reads each field's own metadata."""
    picked = [f"{group}={option}", *REQUIRED.get((group, option), [])] if option else []
    outside = (valid.low if valid.low_open else valid.low - 1) if valid.low is not None else valid.high + 1
    cfg = compose([*picked, f"{key}={outside}", *(["data.min_operand=0"] if key == "data.max_operand" else [])])
    with pytest.raises(ConfigValidationError) as info:
        validate(cfg)
    assert any(p.startswith(f"{key}=") and valid.describe() in p for p in info.value.problems), info.value.problems
    # ... and a value inside passes that check.
    inside = valid.low + 1 if valid.high is None else (valid.low + valid.high) / 2
    try:
        validate(compose([*picked, f"{key}={inside}"]))
    except ConfigValidationError as exc:
        assert not any(p.startswith(f"{key}=") for p in exc.problems), exc.problems


# Schemas that keep defaults of their own (see the so8t.config.schema docstring).
SCHEMA_DEFAULTS = ("RewardTermConfig",)


def test_every_default_lives_in_one_place_the_yaml_option_files():
    """A schema field that the YAML files set has no default in the schema, so the two cannot
    disagree; the YAML option is where a user reads (and docs/config-reference.md lists) it."""
    import dataclasses

    from omegaconf import MISSING

    from so8t.config.schema import TrainConfig

    def defaults(cls, prefix=""):
        import typing

        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                if tp.__name__ not in SCHEMA_DEFAULTS:
                    yield from defaults(tp, f"{prefix}{f.name}.")
            elif f.default is not MISSING or f.default_factory is not dataclasses.MISSING:
                yield f"{prefix}{f.name}", f.default

    with_defaults = list(defaults(TrainConfig))
    for group, _, cls in _group_schemas():
        if cls.__name__ not in SCHEMA_DEFAULTS:
            with_defaults += [(f"{group}.{k}", d) for k, d in defaults(cls)]
    assert with_defaults == []


@pytest.mark.slow
def test_the_cli_refuses_a_value_outside_a_choice_in_one_clear_line(tmp_path):
    """A wrong choice is refused while Hydra composes, as an unknown key or a missing option is:
    exit code 2 (a refused input, not Hydra's own 1), the key and the valid choices named, no
    traceback."""
    import os
    import subprocess

    from tests.conftest import cli_argv

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(cli_argv("hardware.memory_check=bogus"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120)
    assert result.returncode == 2
    assert "Invalid value 'bogus', expected one of [error, warn, off]" in result.stdout
    assert "hardware.memory_check" in result.stdout and "Traceback" not in result.stdout
    for override, named in (("model.does_not_exist=1", "does_not_exist"), ("model=nope", "nope")):
        result = subprocess.run(cli_argv(override), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=120)
        assert result.returncode == 2 and named in result.stdout and "Traceback" not in result.stdout, result.stdout


@pytest.mark.parametrize("key", ["hardware.num_threads", "adapter.gate.kind", "data.seed"])
def test_an_option_file_that_leaves_a_key_out_is_refused_naming_it(key):
    """The schema carries no defaults: a user's own option file without a key is an error
    naming the key, not a silent second default."""
    from omegaconf import OmegaConf

    cfg = compose([])
    OmegaConf.update(cfg, key, "???")
    with pytest.raises(ConfigValidationError, match=f"{key} is not set"):
        validate(cfg)
