"""benchmarks/gpu_check.py in its CPU smoke mode: the script a GPU machine will run works end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_mode_prints_and_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # it must find so8t from the checkout itself
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--layers", "2", "--device", "cpu",
         "--results", str(results), "--workdir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "nf4 variants skipped: needs CUDA" in proc.stdout
    assert "phase     reference" in proc.stdout  # the preflight table of the first variant
    header = "| variant | rollout | estimate (GiB) | peak allocated (GiB)"
    assert header in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| bf16-")]
    assert [line.split("|")[1].strip() for line in table] == ["bf16-reuse", "bf16-full"]
    for line in table:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[6]) > 0 and float(cells[8]) > 0  # sampling and PPO-epoch seconds were measured
        assert abs(float(cells[12])) < 1e-3  # fp32: the training forward matches the sampling pass
        assert int(cells[18].replace(",", "")) > 0  # a checkpoint was written
    text = results.read_text()
    assert text.startswith("# Benchmark results") and "## GPU check" in text and header in text
