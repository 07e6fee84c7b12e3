"""so8t.run.metrics: durable JSON lines, crash-truncated tails, last row per step wins."""

import json
import logging
import math

import pytest

from so8t.run.metrics import MetricsWriter, read_metrics


def test_append_and_read_back_with_non_finite_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write({"step": 1, "reward": 0.5})
        w.write({"step": 2, "reward": math.nan, "kl": math.inf})
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == {"step": 2, "reward": None, "kl": None}
    assert read_metrics(path) == [{"step": 1, "reward": 0.5}, {"step": 2, "reward": None, "kl": None}]


def test_reopen_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write({"step": 1})
    with MetricsWriter(path) as w:
        w.write({"step": 2})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_row_needs_a_step(tmp_path):
    with MetricsWriter(tmp_path / "m.jsonl") as w, pytest.raises(ValueError):
        w.write({"reward": 1.0})


def test_truncated_last_line_is_skipped_then_cut_before_appending(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write({"step": 1, "reward": 0.1})
        w.write({"step": 2, "reward": 0.2})
    with open(path, "ab") as f:  # a crash in the middle of a row
        f.write(b'{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]

    with caplog.at_level(logging.WARNING, logger="so8t.run.metrics"):
        with MetricsWriter(path) as w:
            w.write({"step": 3, "reward": 0.3})
    assert "partial row" in caplog.text
    lines = path.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # every line is whole JSON


def test_file_that_is_only_a_partial_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1')
    assert read_metrics(path) == []
    with MetricsWriter(path) as w:
        w.write({"step": 1})
    assert path.read_text() == '{"step": 1}\n'


def test_reader_keeps_last_row_per_step_sorted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        for step in (1, 2, 3):
            w.write({"step": step, "attempt": 1})
    # crash after step 3, checkpoint was at step 1: steps 2 and 3 are redone
    with MetricsWriter(path) as w:
        for step in (2, 3, 4):
            w.write({"step": step, "attempt": 2})
    rows = read_metrics(path)
    assert [(r["step"], r["attempt"]) for r in rows] == [(1, 1), (2, 2), (3, 2), (4, 2)]


def test_missing_file_reads_empty(tmp_path):
    assert read_metrics(tmp_path / "nope.jsonl") == []


def test_numpy_and_torch_scalars_are_written_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as w:
        w.write({"step": np.int64(1), "a": np.float32(0.5), "b": torch.tensor(float("nan")), "c": torch.tensor(2)})
    assert read_metrics(path) == [{"step": 1, "a": 0.5, "b": None, "c": 2}]


def test_rows_of_earlier_versions_read_under_todays_metric_names(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as w:
        w.write({"step": 1, "reward/mean": 0.5, "entropy": 1.25, "clip_fraction": 0.1, "approx_kl": 0.01,
                 "grad_norm": 2.0, "lr": 1e-3, "episodes": 32, "tokens": 300, "loss/total": 0.7,
                 "loss/policy_loss": 0.2, "loss/value_loss": 0.5, "loss/scale": 65536.0})
        w.write({"step": 2, "reward/mean": 0.6, "policy/entropy": 1.0, "count/episodes": 64})  # a resume, upgraded
    old, new = read_metrics(path)
    assert old == {"step": 1, "reward/mean": 0.5, "policy/entropy": 1.25, "ppo/clip_fraction": 0.1,
                   "ppo/approx_kl": 0.01, "optim/grad_norm": 2.0, "optim/lr": 1e-3, "count/episodes": 32,
                   "count/tokens": 300, "loss/total": 0.7, "loss/policy": 0.2, "loss/value": 0.5,
                   "optim/loss_scale": 65536.0}
    assert new == {"step": 2, "reward/mean": 0.6, "policy/entropy": 1.0, "count/episodes": 64}
