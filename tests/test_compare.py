"""``so8t-compare`` on hand-made run folders: discovery, damaged and foreign folders, differing
keys from the resolved config, metrics, filter/sort, every output format and the plot.
(tests/test_sweep_cli.py runs it on a real sweep.)"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from so8t import compare

REPO_ROOT = Path(__file__).resolve().parents[1]

IDENTITY = {"seed": 0, "ppo.clip_range": 0.2, "ppo.optimizer.betas": [0.9, 0.999], "adapter.kind": "so8"}


def make_run(folder: Path, *, rewards=(0.1, 0.3, 0.2), identity=None, config_yaml=None, status="completed",
             attempts=None, max_steps=None, last_checkpoint=True, extra_rows=()):
    folder.mkdir(parents=True)
    identity = {**IDENTITY, **(identity or {})}
    steps = len(rewards)
    rows = [{"step": i + 1, "reward/mean": r, "loss/total": 1.0 - r} for i, r in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows]))
    session = {
        "status": status, "global_step": steps, "max_steps": max_steps or steps,
        "total_training_time": 75.5,
        "last_checkpoint": {"step": steps, "path": str(folder / "checkpoints" / "x"), "reason": "end"}
        if last_checkpoint else None,
        "config_identity": identity, "updated": "2025-01-01T00:00:00+00:00",
        "attempts": attempts if attempts is not None else [{"index": 1, "resumed_from_step": None, "pid": 1}],
    }
    (folder / "session.json").write_text(json.dumps(session))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(config_yaml if config_yaml is not None else (
        "seed: 0\nexperiment_name: default\nrun_name: ${so8t_run_name:}\nmax_steps: 3\n"
        "hardware:\n  device: cpu\n  num_threads: 2\nadapter:\n  kind: so8\n"
        "ppo:\n  clip_range: 0.2\n  optimizer:\n    betas: [0.9, 0.999]\n"
        "paths:\n  output_dir: outputs\n  logs: ${paths.output_dir}/logs\n"))
    return folder


def run_cli(*args, capsys):
    code = compare.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tree(tmp_path):
    """Two single runs and a two-job sweep in one experiment folder, plus a second experiment."""
    exp = tmp_path / "outputs" / "default"
    make_run(exp / "runs" / "default", rewards=(0.1, 0.2, 0.3))
    make_run(exp / "runs" / "seed=1", rewards=(0.2, 0.5, 0.4), identity={"seed": 1},
             attempts=[{"resumed_from_step": None}, {"resumed_from_step": 2}])
    make_run(exp / "sweeps" / "s" / "ppo.clip_range=0.1", rewards=(0.0, 0.1), identity={"ppo.clip_range": 0.1})
    make_run(exp / "sweeps" / "s" / "ppo.clip_range=0.3", rewards=(0.4, 0.1), identity={"ppo.clip_range": 0.3},
             status="interrupted", max_steps=10)
    return tmp_path


def test_finds_single_runs_and_sweep_jobs_and_reports_them_in_json(tree, capsys):
    code, out, err = run_cli(tree / "outputs", "--format", "json", capsys=capsys)
    assert code == 0 and err == ""
    report = json.loads(out)
    assert set(report) == {"version", "metrics", "differing_keys", "runs", "skipped"}
    assert report["metrics"] == [{"name": "reward/mean", "mode": "max"}]
    assert report["differing_keys"] == ["ppo.clip_range", "seed"]
    runs = {r["run"]: r for r in report["runs"]}
    assert list(runs) == ["runs/default", "runs/seed=1", "sweeps/s/ppo.clip_range=0.1",
                          "sweeps/s/ppo.clip_range=0.3"]
    keys = {"experiment", "run", "path", "status", "step", "max_steps", "last_checkpoint_step", "attempts",
            "resumes", "training_time", "config", "metrics"}
    assert all(set(r) == keys for r in runs.values())
    seed1 = runs["runs/seed=1"]
    assert seed1["experiment"] == "default" and seed1["status"] == "completed"
    assert (seed1["step"], seed1["max_steps"], seed1["last_checkpoint_step"]) == (3, 3, 3)
    assert (seed1["attempts"], seed1["resumes"], seed1["training_time"]) == (2, 1, 75.5)
    assert seed1["config"] == {"ppo.clip_range": 0.2, "seed": 1}
    assert seed1["metrics"]["reward/mean"] == {"last": 0.4, "last_step": 3, "best": 0.5, "best_step": 2}
    assert Path(seed1["path"]) == (tree / "outputs" / "default" / "runs" / "seed=1").resolve()
    assert runs["sweeps/s/ppo.clip_range=0.3"]["status"] == "interrupted"
    assert runs["sweeps/s/ppo.clip_range=0.3"]["max_steps"] == 10


def test_damaged_and_foreign_folders_are_reported_and_skipped(tree, capsys):
    good = tree / "outputs" / "default" / "runs" / "default"
    bad = tree / "outputs" / "bad"
    make_run(bad / "runs" / "json").joinpath("session.json").write_text("{not json")
    make_run(bad / "runs" / "type").joinpath("session.json").write_text('{"global_step": "many"}')
    make_run(bad / "runs" / "list").joinpath("session.json").write_text("[1, 2]")
    metrics = make_run(bad / "runs" / "metrics") / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward/mean": 0.1}\ngarbage\n{"step": 3}\n')
    make_run(bad / "runs" / "nostep").joinpath("metrics.jsonl").write_text('{"reward/mean": 0.1}\n')
    make_run(bad / "runs" / "yaml").joinpath(".hydra", "config.yaml").write_text("a: [1, 2\n")
    binary = make_run(bad / "runs" / "binary") / "session.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    (bad / "runs" / "never_started" / ".hydra").mkdir(parents=True)
    (bad / "runs" / "never_started" / "train.log").write_text("invalid config\n")
    (tree / "outputs" / "notes" / "deep").mkdir(parents=True)
    (tree / "outputs" / "notes" / "deep" / "todo.txt").write_text("not a run")
    (tree / "stray.txt").write_text("a file")
    # A crash mid-write leaves a partial last line: normal, not damage.
    partial = make_run(tree / "outputs" / "default" / "runs" / "partial")
    with open(partial / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')

    code, out, err = run_cli(tree / "outputs", tree / "missing", tree / "stray.txt", good / "session.json",
                             "--format", "json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "json": reasons["json"], "type": reasons["type"], "list": reasons["list"], "metrics": reasons["metrics"],
        "nostep": reasons["nostep"], "yaml": reasons["yaml"], "binary": reasons["binary"],
        "never_started": reasons["never_started"], "deep": reasons["deep"], "missing": "does not exist",
        "stray.txt": "not a folder"}
    assert "session.json is not valid JSON" in reasons["json"]
    assert "'global_step' has a wrong type" in reasons["type"]
    assert "not a JSON object" in reasons["list"]
    assert "metrics.jsonl line 2 is not valid JSON" in reasons["metrics"]
    assert "no integer 'step'" in reasons["nostep"]
    assert ".hydra/config.yaml cannot be read" in reasons["yaml"]
    assert "session.json" in reasons["binary"]
    assert "no session.json" in reasons["never_started"]
    assert "not a run folder" in reasons["deep"]
    # Every skipped folder is also named on stderr; the good runs are all there, each once.
    assert err.count("so8t-compare: skipped") == len(reasons)
    runs = [r["run"] for r in report["runs"]]
    assert sorted(runs) == sorted(set(runs)) and "runs/partial" in runs and "runs/default" in runs
    partial_row = next(r for r in report["runs"] if r["run"] == "runs/partial")
    assert partial_row["metrics"]["reward/mean"]["last_step"] == 3

    code, out, err = run_cli(tree / "outputs" / "notes", capsys=capsys)
    assert code == 1 and "no runs found" in out and "not a run folder" in err


def test_differing_keys_come_from_the_resolved_config_not_only_the_overrides(tmp_path, capsys):
    # An experiment preset changed the adapter and the hardware: no override was typed for them.
    make_run(tmp_path / "default" / "runs" / "default")
    make_run(tmp_path / "tiny_lora" / "runs" / "default", identity={"adapter.kind": "lora", "adapter.r": 8},
             config_yaml="experiment_name: tiny_lora\nrun_name: default\nhardware:\n  num_threads: 1\n")
    code, out, _ = run_cli(tmp_path, "--format", "json", capsys=capsys)
    report = json.loads(out)
    # Result-shaping keys from session.json, the others (hardware) from .hydra/config.yaml;
    # naming keys (run_name, experiment_name) are never "differing config".
    assert report["differing_keys"] == ["adapter.kind", "adapter.r", "hardware.device", "hardware.num_threads",
                                        "max_steps", "paths.logs", "paths.output_dir"]
    by_exp = {r["experiment"]: r for r in report["runs"]}
    assert by_exp["tiny_lora"]["config"]["adapter.kind"] == "lora"
    assert by_exp["default"]["config"]["adapter.r"] is None
    # Interpolations that resolve outside the run are resolved.
    assert by_exp["default"]["config"]["paths.logs"] == "outputs/logs"


def test_filter_sort_and_unknown_keys(tree, capsys):
    def runs(*args):
        code, out, err = run_cli(tree / "outputs", "--format", "json", *args, capsys=capsys)
        return [r["run"] for r in json.loads(out)["runs"]], err

    assert runs("--filter", "ppo.clip_range=0.10")[0] == ["sweeps/s/ppo.clip_range=0.1"]
    assert runs("--filter", "status=interr*")[0] == ["sweeps/s/ppo.clip_range=0.3"]
    assert runs("--filter", "seed=0", "--filter", "run=runs/*")[0] == ["runs/default"]
    assert runs("--filter", "ppo.optimizer.betas=[0.9, 0.999]", "--filter", "seed=1")[0] == ["runs/seed=1"]
    assert runs("--sort=-reward/mean")[0] == ["runs/seed=1", "runs/default", "sweeps/s/ppo.clip_range=0.1",
                                              "sweeps/s/ppo.clip_range=0.3"]
    assert runs("--sort", "best:reward/mean")[0][0] == "sweeps/s/ppo.clip_range=0.1"
    assert runs("--sort", "ppo.clip_range")[0][0] == "sweeps/s/ppo.clip_range=0.1"
    assert runs("--sort=-time", "--sort", "steps")[0][:2] == ["sweeps/s/ppo.clip_range=0.1",
                                                              "sweeps/s/ppo.clip_range=0.3"]
    # A metric not picked with --metric still sorts; a typo is named instead of matching nothing.
    assert runs("--metric", "loss/total", "--sort", "reward/mean")[0][0] == "sweeps/s/ppo.clip_range=0.1"
    kept, err = runs("--filter", "sede=1")
    assert kept == [] and "'sede'" in err
    code, out, _ = run_cli(tree / "outputs", "--filter", "seed=7", capsys=capsys)
    assert code == 0 and "no runs match" in out
    code, _, err = run_cli(tree / "outputs", "--filter", "seed", capsys=capsys)
    assert code == 2 and "KEY=VALUE" in err


def test_metrics_best_direction_and_steps_redone_after_a_resume(tmp_path, capsys):
    # Steps 2-3 were redone after a resume: the rows written last count, once.
    make_run(tmp_path / "r", rewards=(0.1, 0.9, 0.2),
             extra_rows=[{"step": 2, "reward/mean": 0.3, "loss/total": 0.7}, {"step": 3, "reward/mean": 0.25}])
    code, out, _ = run_cli(tmp_path, "--format", "json", "--metric", "reward/mean", "--metric", "loss/total",
                           "--metric", "kl/mean", "--metric", "loss/total:max", capsys=capsys)
    report = json.loads(out)
    assert report["metrics"] == [{"name": "reward/mean", "mode": "max"}, {"name": "loss/total", "mode": "min"},
                                 {"name": "kl/mean", "mode": "min"}]
    metrics = report["runs"][0]["metrics"]
    assert metrics["reward/mean"] == {"last": 0.25, "last_step": 3, "best": 0.3, "best_step": 2}
    assert metrics["loss/total"] == {"last": 0.7, "last_step": 2, "best": 0.7, "best_step": 2}
    assert metrics["kl/mean"] == {"last": None, "last_step": None, "best": None, "best_step": None}


def test_status_killed_when_no_live_process_holds_a_running_run(tmp_path, capsys):
    make_run(tmp_path / "dead", status="running")
    live = make_run(tmp_path / "live", status="running")
    import socket

    (live / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    code, out, _ = run_cli(tmp_path, "--format", "json", capsys=capsys)
    statuses = {r["run"]: r["status"] for r in json.loads(out)["runs"]}
    assert statuses == {"dead": "killed", "live": "running"}


def test_table_fits_100_columns_and_csv_md_carry_every_column(tmp_path, capsys):
    long = "ppo.optimizer.learning_rate=0.0003,ppo.kl.init_coef=0.05,data.max_operand=19,seed="
    for seed in (1, 2):
        make_run(tmp_path / "e1" / "sweeps" / "s" / f"{long}{seed}",
                 identity={"seed": seed, "ppo.optimizer.learning_rate": 3e-4, "ppo.kl.init_coef": 0.05},
                 config_yaml="experiment_name: e1\n")
    make_run(tmp_path / "e2" / "runs" / "x", identity={"seed": 3}, config_yaml="experiment_name: e2\n")
    code, out, _ = run_cli(tmp_path, "--metric", "reward/mean", "--metric", "loss/total", "--width", "100",
                           capsys=capsys)
    lines = out.splitlines()
    assert code == 0 and all(len(line) <= 100 for line in lines), out
    # Too wide for one table: the runs' state, then their config keys and metrics.
    state = lines.index(next(line for line in lines if line.startswith("EXPERIMENT")))
    assert lines[state].split() == ["EXPERIMENT", "RUN", "STATUS", "STEPS", "CKPT", "RES", "TIME"]
    assert [line.split()[0] for line in lines[state + 1:state + 4]] == ["e1", "e1", "e2"]
    assert "1m16s" in lines[state + 1] and "completed" in lines[state + 1]
    assert lines[state + 4] == ""
    assert lines[state + 5].split() == ["reward/mean", "loss/total"]  # metric names above their columns
    assert lines[state + 6].split() == ["RUN", "init_coef", "learning_rate", "seed", "last", "best@step",
                                        "last", "best@step"]
    name = lines[state + 7].split()[0]  # a long run name is shortened in the middle
    assert name.startswith("sweeps/s/ppo.") and name.endswith(",seed=1") and "…" in name
    assert lines[state + 9].split() == ["runs/x", "-", "-", "3", "0.200", "0.300@2", "0.800", "0.700@2"]
    code, out, _ = run_cli(tmp_path, "--width", "200", capsys=capsys)
    assert f"sweeps/s/{long}1" in out and len(out.splitlines()) == 6  # one table, names in full

    code, out, _ = run_cli(tmp_path, "--format", "csv", capsys=capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and rows[0]["run"] == f"sweeps/s/{long}1"
    assert {"experiment", "status", "step", "max_steps", "last_checkpoint_step", "resumes", "training_time",
            "seed", "reward/mean", "reward/mean@best", "reward/mean@best_step"} <= set(rows[0])
    assert rows[0]["reward/mean@best"] == "0.3" and rows[0]["reward/mean@best_step"] == "2"

    code, out, _ = run_cli(tmp_path, "--format", "md", capsys=capsys)
    lines = out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["experiment", "run", "status"] and "reward/mean@best_step" in header
    assert set(lines[1]) <= set("|-:") and lines[1].startswith("|-")
    assert len(lines) == 5 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert [c.strip() for c in lines[2].strip("|").split("|")][1] == f"sweeps/s/{long}1"


def test_plot_writes_a_png_with_one_panel_per_metric(tree, tmp_path, capsys):
    target = tmp_path / "plots" / "curves.png"
    code, _, err = run_cli(tree / "outputs", "--plot", target, "--metric", "reward/mean", "--metric", "loss/total",
                           capsys=capsys)
    assert code == 0 and "plot written" in err
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 5000
    cmp = compare.compare([tree / "outputs"])
    assert compare.plot_labels(cmp) == ["clip_range=0.2, seed=0", "clip_range=0.2, seed=1",
                                        "clip_range=0.1, seed=0", "clip_range=0.3, seed=0"]


@pytest.mark.slow
def test_imports_no_torch_and_is_a_console_script(tmp_path):
    heavy = ("torch", "transformers", "hydra", "matplotlib")
    code = f"import sys, so8t.compare; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    assert 'so8t-compare = "so8t.compare:main"' in (REPO_ROOT / "pyproject.toml").read_text()
    proc = subprocess.run([sys.executable, "-m", "so8t.compare", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "no runs found" in proc.stdout and "skipped" in proc.stderr


def test_many_differing_keys_wrap_into_tables_that_fit_100_columns(tmp_path, capsys):
    so8 = {f"adapter.gate.key_number_{i}": i for i in range(12)}
    lora = {"adapter.kind": "lora", "adapter.target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "lm_head"],
            "adapter.r": 8, "adapter.alpha": 16.0}
    make_run(tmp_path / "e" / "runs" / "so8", identity=so8)
    make_run(tmp_path / "e" / "runs" / "lora", identity=lora)
    code, out, _ = run_cli(tmp_path, "--width", "100", capsys=capsys)
    lines = out.splitlines()
    assert code == 0 and all(len(line) <= 100 for line in lines), out
    tables = out.split("\n\n")
    assert len(tables) >= 3  # the state, then the config keys and metrics over several tables
    assert all("RUN" in table for table in tables)
    assert "reward/mean" in out and "key_number_11" in out and "target_modules" in out
    assert "…" in out  # the long list value is shortened in the middle


def test_metrics_come_from_the_runs_own_output_metrics_file(tmp_path, capsys):
    run = make_run(tmp_path / "outputs" / "default" / "runs" / "custom", rewards=(0.1, 0.2),
                   config_yaml="seed: 0\nexperiment_name: default\noutput:\n  metrics_file: rows.jsonl\n")
    (run / "metrics.jsonl").rename(run / "rows.jsonl")
    code, out, _ = run_cli(tmp_path / "outputs", "--format", "json", capsys=capsys)
    assert code == 0
    summary = json.loads(out)["runs"][0]["metrics"]["reward/mean"]
    assert (summary["last"], summary["best"], summary["best_step"]) == (0.2, 0.2, 2)


def test_runs_logged_under_the_old_metric_names_compare_with_new_ones(tmp_path, capsys):
    """Runs of an earlier version logged ``entropy``, ``lr`` …: they read under today's names."""
    old = make_run(tmp_path / "e" / "runs" / "old", rewards=(0.1, 0.2), identity={"seed": 1})
    new = make_run(tmp_path / "e" / "runs" / "new", rewards=(0.3, 0.4), identity={"seed": 2})
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "reward/mean": 0.1, "entropy": 1.5, "loss/policy_loss": 0.3},
        {"step": 2, "reward/mean": 0.2, "entropy": 1.2, "loss/policy_loss": 0.2}]))
    (new / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "reward/mean": 0.3, "policy/entropy": 1.1, "loss/policy": 0.1},
        {"step": 2, "reward/mean": 0.4, "policy/entropy": 0.9, "loss/policy": 0.05}]))
    code, out, err = run_cli(tmp_path, "--format", "json", "--metric", "policy/entropy", "--metric", "loss/policy",
                             capsys=capsys)
    assert code == 0 and err == ""
    metrics = {r["run"]: r["metrics"] for r in json.loads(out)["runs"]}
    assert metrics["runs/old"]["policy/entropy"] == {"last": 1.2, "last_step": 2, "best": 1.5, "best_step": 1}
    assert metrics["runs/new"]["loss/policy"] == {"last": 0.05, "last_step": 2, "best": 0.05, "best_step": 2}
    assert metrics["runs/old"]["loss/policy"]["last"] == 0.2
    # An old name on the command line names today's metric.
    code, out, _ = run_cli(tmp_path, "--format", "json", "--metric", "entropy", capsys=capsys)
    report = json.loads(out)
    assert report["metrics"] == [{"name": "policy/entropy", "mode": "max"}]
    assert {r["run"]: r["metrics"]["policy/entropy"]["last"] for r in report["runs"]} == {"runs/old": 1.2,
                                                                                       "runs/new": 0.9}
    # ... and so does one in --sort and --filter, with no "no run has" warning.
    code, out, err = run_cli(tmp_path, "--format", "json", "--sort=-best:entropy", "--filter", "loss/policy_loss=0.2",
                             capsys=capsys)
    assert code == 0 and err == ""
    assert [r["run"] for r in json.loads(out)["runs"]] == ["runs/old"]
    code, out, err = run_cli(tmp_path, "--format", "json", "--sort=entropy", capsys=capsys)
    assert err == "" and [r["run"] for r in json.loads(out)["runs"]] == ["runs/new", "runs/old"]
