"""The wheel ships every module and config file (CI builds it, installs it into a fresh virtual
environment and runs so8t-train from an empty folder; see .ci/run)."""

from __future__ import annotations

from pathlib import Path

import tomllib

from so8t.config import CONF_DIR, EXPERIMENTS_DIR

REPO = Path(__file__).resolve().parents[1]


def _packages() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_and_config_folder_is_listed_for_the_wheel():
    listed = _packages()
    modules = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "so8t").rglob("__init__.py")}
    configs = {".".join(("so8t", "conf", *d.relative_to(REPO / "conf").parts))
               for d in (REPO / "conf").rglob("*") if d.is_dir() and d.name != "__pycache__"}
    data = {"so8t.model.assets.tiny"}
    assert modules | configs | data | {"so8t.conf", "so8t.experiments"} == listed


def test_configs_are_found_through_the_package():
    # In an editable install the package maps to the repository's folders; in a wheel, to its copy.
    assert (CONF_DIR / "train.yaml").is_file() and (EXPERIMENTS_DIR / "tiny_lora.yaml").is_file()
    assert CONF_DIR.samefile(REPO / "conf") and EXPERIMENTS_DIR.samefile(REPO / "experiments")
