"""Shared fixtures: compose a config, run the real CLI, inject faults.

* ``compose(overrides)`` / the ``compose`` fixture: the config ``so8t-train`` would compose
  (the shipped conf/ through so8t.config, presets registered), without running anything;
  ``typed_config(overrides)``: the same, validated and typed, as the run receives it.
* ``cli_argv(*overrides)``, ``cli_env()`` and the ``so8t_cli`` fixture: the real CLI in a
  subprocess (``python -m so8t.train``), bars off, output unbuffered, Hydra's full errors; the
  fixture runs it in its own folder and returns the finished process, output in ``.stdout``.
* ``full_disk(monkeypatch, file_name)`` / the ``full_disk`` fixture: writing one file of a
  checkpoint stops half-way with ENOSPC, as a full disk does.

Tests that start processes carry the ``slow`` marker (CI runs them all).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

CLI_TIMEOUT = 300  # seconds per process; generous for a loaded 2-core machine


def compose(overrides: Iterable[str] = ()):
    """The composed (not validated) config for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from so8t.config import CONF_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def typed_config(overrides: Iterable[str] = ()):
    """The validated, typed config (a TrainConfig) for these overrides, as so8t-train passes
    it to the run."""
    from so8t.config.validate import validate

    return validate(compose(overrides))


def cli_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", **extra)


def cli_argv(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "so8t.train", "output.progress_bars=false", *overrides]


def run_cli(cwd: Path, *overrides: str, timeout: float = CLI_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """Run ``so8t-train`` to its end in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cli_argv(*overrides), cwd=cwd, env=cli_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def full_disk(monkeypatch, file_name: str) -> None:
    """Make writing ``file_name`` of a checkpoint stop half-way with ENOSPC."""
    from so8t.checkpoint import store as store_module

    real = store_module._write_durable

    def write(path, data):
        if path.name == file_name:
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(store_module, "_write_durable", write)


@pytest.fixture(name="compose")
def compose_fixture():
    return compose


@pytest.fixture
def so8t_cli(tmp_path):
    """``so8t_cli(*overrides)`` runs the CLI in ``tmp_path/work`` (``so8t_cli.cwd``)."""
    cwd = tmp_path / "work"
    cwd.mkdir()

    def run(*overrides: str, timeout: float = CLI_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
        return run_cli(cwd, *overrides, timeout=timeout, **env)

    run.cwd = cwd
    return run


@pytest.fixture(name="full_disk")
def full_disk_fixture(monkeypatch):
    """``full_disk(file_name)``: that checkpoint file's write fails half-way with ENOSPC."""
    return lambda file_name: full_disk(monkeypatch, file_name)
