"""Fuzz: every file of a run folder and of its checkpoints, mutated many times.

A finished 4-step run (checkpoints at steps 2 and 4, ``final/``, session, metrics, Hydra's
records) is copied, one of its files is mutated — bit flips, truncation, random bytes, huge
nesting, a symlink, a JSON value of the wrong type, deletion — and the run is continued to step 5
by the recipe (in-process, for speed; a few cases go through the real CLI too). Whatever the
mutation, the outcome is one of: it resumes from step 4 or falls back to step 2, or it refuses
with exit code 2 and a message. Never a traceback (exit 1), never a silent fresh start.

``SO8T_FUZZ_ITERATIONS`` sets the number of in-process cases (default 60, about 40 s).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from so8t.config import CONF_DIR, register
from so8t.config.validate import validate

pytestmark = pytest.mark.slow

ITERATIONS = int(os.environ.get("SO8T_FUZZ_ITERATIONS", "60"))
RUN_ARGS = ["output.progress_bars=false", "run_name=fuzz", "checkpoint=step", "checkpoint.every_steps=2",
            "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1", "hardware.num_threads=1"]
EXIT_REFUSED = 2
WRONG_VALUES = [[], {}, "x", -1, 10**30, 1e308, None, True, [[[]]], {"__tensor__": "nope"}]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("fuzz-base")
    result = subprocess.run([sys.executable, "-m", "so8t.train", *RUN_ARGS, "max_steps=4"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    run = cwd / "outputs" / "default" / "runs" / "fuzz"
    assert (run / "checkpoints" / "step_00000002").is_dir() and (run / "checkpoints" / "step_00000004").is_dir()
    return run


def _files(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.is_file() and not p.is_symlink())


def _mutate_json(path: Path, rng: random.Random) -> str:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return _flip(path, rng)
    containers = []

    def walk(node):
        if isinstance(node, dict):
            for key in node:
                containers.append((node, key))
                walk(node[key])
        elif isinstance(node, list):
            for index in range(len(node)):
                containers.append((node, index))
                walk(node[index])

    walk(data)
    if not containers:
        path.write_text(json.dumps(rng.choice(WRONG_VALUES)))
        return "json-root"
    node, key = rng.choice(containers)
    node[key] = rng.choice(WRONG_VALUES)
    path.write_text(json.dumps(data))
    return f"json-type[{key}]"


def _flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        path.write_bytes(b"\xff")
        return "flip-empty"
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "bit-flip"


def mutate(run: Path, rng: random.Random) -> str:
    path = rng.choice(_files(run))
    kind = rng.choice(["flip", "truncate", "random", "nest", "symlink", "json", "delete"])
    if kind == "flip":
        what = _flip(path, rng)
    elif kind == "truncate":
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(rng.randint(0, max(0, size - 1)))
        what = "truncate"
    elif kind == "random":
        path.write_bytes(os.urandom(rng.randint(0, 4096)))
        what = "random-bytes"
    elif kind == "nest":
        depth = rng.choice([1000, 100_000])
        path.write_bytes(b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth)
        what = f"nesting-{depth}"
    elif kind == "symlink":
        # A link to another regular file of the run (same name in the other checkpoint, when
        # there is one): the bytes may even be valid, the link must still not be followed.
        others = [p for p in _files(run) if p != path]
        twin = [p for p in others if p.name == path.name]
        target = rng.choice(twin or others)
        path.unlink()
        os.symlink(target, path)
        what = "symlink"
    elif kind == "json" and path.suffix in (".json", "") and path.name not in (".lock.os",):
        what = _mutate_json(path, rng)
    else:
        path.unlink()
        what = "delete"
    return f"{what} of {path.relative_to(run)}"


def compose_cfg(max_steps: int):
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return validate(compose("train", overrides=[*RUN_ARGS, f"max_steps={max_steps}"]))


RESUMED = re.compile(r"resumed from step (\d+)")


def check_outcome(code: int, text: str, what: str) -> None:
    assert "Traceback" not in text and code != 1, f"{what}: exit {code}, a crash:\n{text[-3000:]}"
    assert code in (0, EXIT_REFUSED), f"{what}: exit {code}\n{text[-3000:]}"
    assert "starting fresh" not in text, f"{what}: a silent fresh start\n{text[-3000:]}"
    if code == 0:
        steps = [int(s) for s in RESUMED.findall(text)]
        assert steps and steps[-1] in (2, 4), f"{what}: resumed from {steps}\n{text[-3000:]}"
    else:
        assert "ERROR" in text, f"{what}: refused without saying why\n{text[-3000:]}"


def test_mutated_run_folders_resume_fall_back_or_refuse_never_crash(base_run, tmp_path, caplog):
    from so8t.recipe import run_training

    cfg = compose_cfg(5)
    rng = random.Random(int(os.environ.get("SO8T_FUZZ_SEED", "0")))
    outcomes = {}
    for i in range(ITERATIONS):
        run = tmp_path / f"case{i:03d}"
        shutil.copytree(base_run, run, symlinks=True)
        what = mutate(run, rng)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="so8t"):
            code = run_training(cfg, run)
        check_outcome(code, caplog.text, what)
        outcomes[what] = code
        shutil.rmtree(run)
    kinds = {w.split(" of ")[0].split("[")[0] for w in outcomes}
    assert len(kinds) >= 5, kinds  # the mutations were varied
    assert 0 in outcomes.values()


@pytest.mark.parametrize("mutation", [
    lambda run: (run / "session.json").write_bytes(b"\xff\xfe\x00 not utf-8"),
    lambda run: (run / "checkpoints" / "step_00000004" / "MANIFEST.json").write_bytes(b"[" * 200_000),
    lambda run: _set_manifest(run, "step_00000004", "config_identity", ["a", "list"]),
    lambda run: _set_manifest(run, "step_00000004", "config_identity",
                              {**_manifest(run, "step_00000004")["config_identity"], "model.kind": "elsewhere"}),
], ids=["session-not-utf8", "manifest-deep-nesting", "identity-not-a-dict", "identity-of-another-model"])
def test_the_cli_on_a_mutated_run_folder(base_run, tmp_path, mutation):
    cwd = tmp_path
    run = cwd / "outputs" / "default" / "runs" / "fuzz"
    shutil.copytree(base_run, run, symlinks=True)
    mutation(run)
    result = subprocess.run([sys.executable, "-m", "so8t.train", *RUN_ARGS, "max_steps=5"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    check_outcome(result.returncode, result.stdout, "cli")


def _manifest(run: Path, name: str) -> dict:
    return json.loads((run / "checkpoints" / name / "MANIFEST.json").read_text())


def _set_manifest(run: Path, name: str, key: str, value) -> None:
    manifest = _manifest(run, name)
    manifest[key] = value
    (run / "checkpoints" / name / "MANIFEST.json").write_text(json.dumps(manifest))
