"""so8t.run.attempts: every attempt's Hydra config is kept under attempts/NNN/."""

from so8t.run.attempts import archive_hydra_config, next_attempt_number


def _hydra(run_dir, overrides):
    d = run_dir / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(f"trainer:\n  max_steps: {overrides}\n")
    (d / "overrides.yaml").write_text(f"- trainer.max_steps={overrides}\n")
    (d / "hydra.yaml").write_text("hydra: {}\n")


def test_no_hydra_folder_archives_nothing(tmp_path):
    assert archive_hydra_config(tmp_path) is None
    assert not (tmp_path / "attempts").exists()


def test_each_attempt_gets_the_next_number_and_keeps_its_overrides(tmp_path):
    _hydra(tmp_path, 100)
    first = archive_hydra_config(tmp_path)
    assert first == tmp_path / "attempts" / "001"
    assert sorted(p.name for p in first.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]

    _hydra(tmp_path, 200)  # Hydra rewrites .hydra on the next start
    second = archive_hydra_config(tmp_path)
    assert second == tmp_path / "attempts" / "002"
    assert "max_steps=100" in (first / "overrides.yaml").read_text()
    assert "max_steps=200" in (second / "overrides.yaml").read_text()
    assert next_attempt_number(tmp_path) == 3


def test_interrupted_copy_is_cleaned_and_never_numbered(tmp_path):
    _hydra(tmp_path, 1)
    leftover = tmp_path / "attempts" / ".tmp-001-999"
    leftover.mkdir(parents=True)
    (leftover / "config.yaml").write_text("half")
    assert archive_hydra_config(tmp_path).name == "001"
    assert not leftover.exists()
