"""so8t-verify-resume: the real command on a short run, its comparison, and a bad override."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from so8t.verify_resume import compare

pytestmark = pytest.mark.slow


def verify(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "so8t.verify_resume", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_the_default_config_resumes_exactly(tmp_path):
    result = verify("--updates", "2", "debug=fast", "--keep", str(tmp_path / "kept"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    for part in ("weights", "optimizer", "lr_scheduler", "kl_controller", "sampler", "rng", "metrics rows"):
        assert any(line.split()[:1] == [part.split()[0]] and "identical" in line
                   for line in result.stdout.splitlines()), (part, result.stdout)
    assert "RESUME IS EXACT" in result.stdout
    # It really was killed: the resumed run has two attempts, the first one killed.
    log = next((tmp_path / "kept").glob("resumed/*/runs/verify/train.log")).read_text()
    assert "resumed from step 1" in log


def test_a_bad_override_is_refused_with_so8t_trains_message(tmp_path):
    result = verify("--updates", "2", "ppo.clip_range=-1", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "clip_range" in result.stdout and "Traceback" not in result.stdout


def test_options_it_sets_itself_are_refused(tmp_path):
    result = verify("max_steps=10", cwd=tmp_path)
    assert result.returncode == 2 and "set by so8t-verify-resume itself" in result.stdout


def test_compare_says_where_and_by_how_much():
    a = {"w": torch.zeros(4), "step": 3, "betas": (0.9, 0.999), "ids": torch.tensor([1, 2])}
    b = {"w": torch.tensor([0.0, 0.5, 0.0, -2.0]), "step": 4, "betas": (0.9, 0.999), "ids": torch.tensor([1, 3])}
    lines = compare(a, b, "optimizer")
    assert "optimizer.w: 2 of 4 values differ, max |diff| 2" in lines
    assert "optimizer.step: 3 vs 4 (|diff| 1)" in lines
    assert "optimizer.ids: 1 of 2 values differ" in lines
    assert not [line for line in lines if "betas" in line]
    assert compare(a, dict(a), "x") == []
