"""Run folders written under the old names of renamed config keys (model.source, data.source,
checkpoint.policy) still complete, resume and load; an override of an old name is refused
with the new one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from so8t.config.identity import RENAMED_KEYS, upgrade_identity, upgrade_section
from so8t.run.folder_manifest import verify_folder, write_manifest
from so8t.run.metrics import read_metrics

pytestmark = pytest.mark.slow

RUN = ("debug=fast", "hardware.num_threads=1", "checkpoint=step", "checkpoint.every_steps=1", "run_name=old")


def _old_names(flat: dict) -> dict:
    """A flat identity as the code before the renames wrote it."""
    back = {new: old for old, new in RENAMED_KEYS.items()}
    return {back.get(key, key): value for key, value in flat.items()}


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _as_written_before_the_renames(run: Path) -> None:
    """Put the run folder's records under the old key names, each still verifying."""
    for manifest in sorted((run / "checkpoints").glob("step_*/MANIFEST.json")):
        _rewrite_json(manifest, lambda m: m.update(config_identity=_old_names(m["config_identity"])))
    _rewrite_json(run / "session.json", lambda s: s.update(config_identity=_old_names(s["config_identity"])))

    def old_model_section(meta):
        meta["model"]["source"] = meta["model"].pop("kind")

    _rewrite_json(run / "final" / "policy.json", old_model_section)
    # The old code wrote final/'s manifest over its own policy.json.
    (run / "final" / "MANIFEST.json").unlink()
    write_manifest(run / "final")
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["source"] = config["model"].pop("kind")
    config["data"]["source"] = config["data"].pop("kind")
    config["checkpoint"]["policy"] = config["checkpoint"].pop("cadence")
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def test_a_run_folder_with_the_old_key_names_completes_loads_and_resumes(so8t_cli):
    first = so8t_cli(*RUN)
    assert first.returncode == 0, first.stdout[-3000:]
    run = so8t_cli.cwd / "outputs" / "default" / "runs" / "old"
    _as_written_before_the_renames(run)
    assert "model.source" in json.loads((run / "session.json").read_text())["config_identity"]
    assert verify_folder(run / "final") == []

    # The same command: session.json's (old-named) identity matches, so the run is recognised
    # as completed without building the model.
    again = so8t_cli(*RUN)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "run already completed" in again.stdout and "skipped" in again.stdout

    # final/policy.json with model.source loads.
    import so8t

    policy = so8t.load_policy(run / "final")
    assert len(policy.generate(["3+4="], max_new_tokens=4)) == 1

    # A larger max_steps resumes from the old-named checkpoint of step 3 (model.* is a shape key:
    # under the old name unmapped, this resume would be refused).
    longer = so8t_cli(*RUN, "max_steps=5")
    assert longer.returncode == 0, longer.stdout[-3000:]
    assert "resumed from step 3" in longer.stdout
    assert "refus" not in longer.stdout.lower()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_an_export_of_an_old_named_checkpoint_reads_its_model_kind(so8t_cli):
    from so8t.export.source import load_trained_policy

    first = so8t_cli(*RUN)
    assert first.returncode == 0, first.stdout[-3000:]
    run = so8t_cli.cwd / "outputs" / "default" / "runs" / "old"
    _as_written_before_the_renames(run)
    trained = load_trained_policy(run / "checkpoints" / "step_00000003")
    assert trained.model_cfg["kind"] == "tiny" and "source" not in trained.model_cfg
    assert load_trained_policy(run / "final").model_cfg["kind"] == "tiny"


@pytest.mark.parametrize("override, new", [("checkpoint.policy=time", "checkpoint.cadence=time"),
                                           ("model.source=hub", "model.kind=hub"),
                                           ("data.source=jsonl", "data.kind=jsonl")])
def test_an_override_of_an_old_name_is_refused_naming_the_new_one(so8t_cli, override, new):
    result = so8t_cli(override)
    assert result.returncode == 2
    assert new in result.stdout and "Traceback" not in result.stdout


def test_upgrade_keeps_new_names_and_renames_old_ones():
    assert upgrade_identity({"model.source": "hub", "ppo.gamma": 1.0}) == {"model.kind": "hub", "ppo.gamma": 1.0}
    assert upgrade_identity({"model.kind": "tiny"}) == {"model.kind": "tiny"}
    assert upgrade_section("model", {"source": "local", "path": "/m"}) == {"kind": "local", "path": "/m"}
    assert upgrade_section("data", {"kind": "jsonl"}) == {"kind": "jsonl"}
