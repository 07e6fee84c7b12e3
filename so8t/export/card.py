"""The model card (``README.md``) of an export: what the model is and how it was made.

It names the base model and the adapter, the steps trained, a summary of the reward curve
(from the run's ``metrics.jsonl``, up to the exported step), the training command and resolved
config (from the run's ``.hydra/``), the export command and how to load the folder.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REWARD_KEY = "reward/mean"


@dataclass
class CardFacts:
    """What the export did, for the card."""

    layout: str  # "merged" or "peft"
    dtype: str
    architecture: str
    base_model: str  # how to name the base for loading (hub id or folder)
    export_command: str
    check: dict | None  # {"max_abs_logits": …, "max_abs_values": …} of the export's self-check


def base_model_name(model_cfg: dict) -> str:
    """The base model as a loader would name it (the tiny model's shipped folder for ``tiny``)."""
    from so8t.model.tiny import TINY_DIR

    if model_cfg.get("kind") == "tiny":
        return str(TINY_DIR)
    return str(model_cfg.get("path"))


def reward_summary(rows: list[dict[str, Any]], up_to_step: int | None) -> dict[str, Any] | None:
    """First/last 10 % means, best and last of ``reward/mean`` over the rows up to the step."""
    points = [(r["step"], float(r[REWARD_KEY])) for r in rows
              if isinstance(r.get(REWARD_KEY), (int, float)) and (up_to_step is None or r["step"] <= up_to_step)]
    if not points:
        return None
    tenth = max(1, len(points) // 10)
    best_step, best = max(points, key=lambda p: p[1])
    return {
        "updates": len(points),
        "first_10pct_mean": sum(v for _, v in points[:tenth]) / tenth,
        "last_10pct_mean": sum(v for _, v in points[-tenth:]) / tenth,
        "best": best,
        "best_step": best_step,
        "last": points[-1][1],
        "last_step": points[-1][0],
    }


def run_record(run_dir: Path | None) -> dict[str, Any]:
    """Training command, resolved config and reward rows read from the run folder (what exists)."""
    record: dict[str, Any] = {"command": None, "config_yaml": None, "metrics": []}
    if run_dir is None:
        return record
    hydra_dir = run_dir / ".hydra"
    try:
        from omegaconf import OmegaConf

        overrides = OmegaConf.load(hydra_dir / "overrides.yaml")
        record["command"] = shlex.join(["so8t-train", *[str(o) for o in overrides]])
    except Exception as exc:  # a missing or damaged file leaves the card without the command
        log.warning("no training command for the card (%s/overrides.yaml: %s)", hydra_dir, exc)
    metrics_file = "metrics.jsonl"
    try:
        cfg = OmegaConf.load(hydra_dir / "config.yaml")
        # run_name is computed by a resolver that only exists inside a Hydra job.
        cfg.run_name = run_dir.name
        metrics_file = str(OmegaConf.select(cfg, "output.metrics_file", default=None)
                           # runs written before the output group was split from logger
                           or OmegaConf.select(cfg, "logger.metrics_file", default=metrics_file))
        try:
            record["config_yaml"] = OmegaConf.to_yaml(cfg, resolve=True)
        except Exception:  # another interpolation that needs Hydra: show it unresolved
            record["config_yaml"] = OmegaConf.to_yaml(cfg)
    except Exception as exc:
        log.warning("no training config for the card (%s/config.yaml: %s)", hydra_dir, exc)
    from so8t.run.metrics import read_metrics

    record["metrics"] = read_metrics(run_dir / metrics_file)
    return record


def render_card(trained, facts: CardFacts, out_name: str) -> str:
    from so8t import __version__

    record = run_record(trained.run_dir)
    summary = reward_summary(record["metrics"], trained.step)
    adapter = trained.adapter_cfg
    library = "peft" if facts.layout == "peft" else "transformers"
    lines = [
        "---",
        f"library_name: {library}",
        # The hub reads base_model as a hub id: only name it when the run loaded one.
        *([f"base_model: {facts.base_model}"] if trained.model_cfg.get("kind") == "hub" else []),
        f"tags: [so8t, ppo, {'so8-rotation' if adapter.get('kind') == 'so8' else 'lora'}]",
        "---",
        "",
        f"# {out_name}",
        "",
        "A causal LM policy trained with PPO by SO8T and exported by `so8t-export`.",
        "",
        "## Model",
        "",
        f"* Base model: `{facts.base_model}` (SO8T model config: `{_inline(trained.model_cfg)}`)",
        f"* Architecture: `{facts.architecture}`, weights in `{facts.dtype}`",
        f"* Adapter: {_adapter_text(adapter, trained.gate, facts.layout)}",
        f"* Trained: {trained.step if trained.step is not None else 'unknown'} PPO updates "
        "(exported from the run's "
        f"{'`final/`' if trained.source_kind == 'final' else 'checkpoint `' + trained.source.name + '`'})",
    ]
    if facts.check is not None:
        lines.append(
            f"* Checked at export on a probe batch: max |Δ logits| = {facts.check['max_abs_logits']:.3g}, "
            f"max |Δ values| = {facts.check['max_abs_values']:.3g} against the adapted policy (fp32)"
        )
    lines += ["", "## Load it", "", "```python", *_load_snippet(facts, out_name), "```", ""]
    lines += [
        "The tokenizer (with its chat template, if the base has one) is in this folder, and",
        "`generation_config.json` holds the model's stop (EOS) token ids, so `generate()` stops where",
        "the policy learned to stop. The tokenizer pads on the left, as in training.",
        "",
        "## Value head",
        "",
        "`value_head.safetensors` holds PPO's value head (`weight` (1, hidden), `bias` (1), fp32): it is",
        "not part of a causal LM, so transformers ignores it. It maps the model's final hidden state",
        "(`output_hidden_states=True`, the last entry: after the final norm) to a value estimate, and",
        "is only needed to continue PPO. `so8t.load_policy(\"<this folder>\")` loads model and value head.",
    ]
    if facts.layout == "merged" and adapter.get("kind") == "so8":
        lines.append("Merging the rotations changed the basis of that hidden state; the exported value head "
                     "is rewritten accordingly and reads this model's hidden state.")
    lines += ["", "## Training", ""]
    if record["command"]:
        lines += ["Command (run in the folder that holds `outputs/`):", "", "```bash", record["command"], "```", ""]
    if summary is not None:
        lines += [
            f"Reward (`{REWARD_KEY}`) over {summary['updates']} updates:",
            "",
            "| first 10 % mean | last 10 % mean | best (step) | last (step) |",
            "|---|---|---|---|",
            f"| {summary['first_10pct_mean']:.3f} | {summary['last_10pct_mean']:.3f} | "
            f"{summary['best']:.3f} ({summary['best_step']}) | {summary['last']:.3f} ({summary['last_step']}) |",
            "",
        ]
    if record["config_yaml"]:
        lines += ["Resolved training config:", "", "```yaml", record["config_yaml"].rstrip(), "```", ""]
    lines += [
        "## Produced by",
        "",
        "```bash",
        facts.export_command,
        "```",
        "",
        f"so8t {__version__}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
        f"from `{trained.source.resolve()}`.",
        "",
    ]
    return "\n".join(lines)


def _adapter_text(adapter: dict, gate: float | None, layout: str) -> str:
    if adapter.get("kind") == "so8":
        layers = adapter.get("layers")
        return (f"SO(8) residual rotations after decoder layers {'all' if layers is None else layers} "
                f"(gate {gate}), merged exactly into the weights: a plain model, no custom code")
    what = (f"LoRA r={adapter.get('r')} alpha={adapter.get('alpha')} on "
            f"{adapter.get('target_modules')}")
    return what + (" merged into the weights (`merge_and_unload`)" if layout == "merged"
                   else " as a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`)")


def _load_snippet(facts: CardFacts, out_name: str) -> list[str]:
    if facts.layout == "peft":
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({facts.base_model!r})",
            f"model = PeftModel.from_pretrained(base, {out_name!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({out_name!r})",
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({out_name!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({out_name!r})",
    ]


def _inline(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())
