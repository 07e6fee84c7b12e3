"""The real CLI on a Phi-3.5-style instruct model, as `experiment=phi35_rtx3060` runs it.

The model (tests/phi35_style.py) has Phi-3's architecture, Phi-3.5's chat template and
special tokens, three stop ids in its generation config and a pad token equal to EOS; it is
saved to a folder and run in bf16 on the CPU with small sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from so8t.run.metrics import read_metrics
from tests.phi35_style import make_phi35_style_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL = ["hardware=cpu", "hardware.dtype=bfloat16", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2",
         "ppo.max_new_tokens=16", "output.progress_bars=false", "run_name=phi"]


def recording_reward(completions, prompts, messages, **kwargs):
    """A user reward term that writes down exactly what it was given."""
    with open(os.environ["SO8T_TEST_RECORD"], "a", encoding="utf-8") as out:
        for completion, prompt, chat in zip(completions, prompts, messages):
            out.write(json.dumps({"completion": completion, "prompt": prompt, "messages": chat}) + "\n")
    return [0.0] * len(completions)


def run(cwd: Path, *overrides: str, record: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if record is not None:
        env["SO8T_TEST_RECORD"] = str(record)
    return subprocess.run([sys.executable, "-m", "so8t.train", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi35")
    model = make_phi35_style_model(root / "model")
    record = root / "record.jsonl"
    common = ["experiment=phi35_rtx3060", f"model.path={model}", *SMALL,
              "+reward.terms.record={_target_:tests.test_instruct_cli.recording_reward,_partial_:true,weight:0}"]
    first = run(root, *common, "max_steps=2", record=record)
    resumed = run(root, *common, "max_steps=3", record=record)
    return root, model, record, first, resumed, common


def test_the_phi35_preset_runs_chat_prompts_and_stops_at_end_of_turn(phi_run):
    root, model, record, first, _, _ = phi_run
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = root / "outputs" / "phi35_rtx3060" / "runs" / "phi"
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen) >= 8
    for row in seen:
        # The prompt is the chat template's rendering of the system prompt, instruction and question.
        assert row["prompt"].startswith("<|system|>\nYou are a careful calculator.")
        assert "<|user|>\nAdd the two numbers: " in row["prompt"] and row["prompt"].endswith("<|assistant|>\n")
        assert [m["role"] for m in row["messages"]] == ["system", "user"]
        # Reward terms see the answer without the chat template's special tokens.
        assert "<|" not in row["completion"]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    stopped = [s for s in samples if s["ended_with_stop"]]
    assert stopped and all(s["raw"].endswith("<|end|>") for s in stopped)
    assert all(s["completion"] == s["raw"].removesuffix("<|end|>") for s in stopped)
    log = (run_dir / "train.log").read_text()
    assert "old log-probs recomputed with the training forward" in log
    rows = read_metrics(run_dir / "metrics.jsonl")
    # bf16 with recompute: the first mini-batch's ratio is exactly 1 and the KL starts at 0.
    assert rows[0]["ppo/ratio_max_dev_start"] == 0.0 and rows[0]["kl/mean"] == 0.0
    assert rows[0]["response/eos_rate"] > 0
    policy = json.loads((run_dir / "final" / "policy.json").read_text())
    assert policy["stop_token_ids"] == [1, 6, 7]


def test_the_phi35_preset_checkpoints_and_resumes(phi_run):
    root, _, _, first, resumed, _ = phi_run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = root / "outputs" / "phi35_rtx3060" / "runs" / "phi"
    assert "resumed from step 2" in (run_dir / "train.log").read_text()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    manifest = json.loads((run_dir / "checkpoints" / "step_00000003" / "MANIFEST.json").read_text())
    identity = manifest["config_identity"]
    assert identity["model.weights_fingerprint"] and identity["model.config_fingerprint"]


def test_resume_on_other_base_weights_at_the_same_path_is_refused(phi_run, tmp_path):
    root, model, _, _, resumed, common = phi_run
    assert resumed.returncode == 0
    # Same folder, same config, same file sizes: only the weights' values change.
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    state = load_file(str(weights))
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = state[name] + torch.ones_like(state[name])
    save_file(state, str(weights), metadata={"format": "pt"})
    proc = run(root, *common, "max_steps=5", record=tmp_path / "r.jsonl")
    assert proc.returncode == 2, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "model.weights_fingerprint" in out and "Traceback" not in out
