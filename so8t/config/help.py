"""``so8t-train --help``: the command's name, what each config group is for, and its options.

Hydra's own listing names the internal ``*_schema`` entries as choices; this one lists only the
YAML options a user picks, read from the shipped conf/ and experiments/ folders.
"""

from __future__ import annotations

from pathlib import Path

# What each group is for, in the order --help lists them.
GROUPS = {
    "model": "the base causal LM (the embedded tiny model, a local folder, a hub id in the local cache)",
    "adapter": "what is trained: SO(8) residual rotations (so8) or PEFT LoRA (lora)",
    "ppo": "PPO: rollout and mini-batch sizes, clipping, KL penalty, LR schedule; ppo/optimizer=adamw|adam|sgd",
    "reward": "the reward terms and their weights (format, exact answer, a reward model ...)",
    "data": "the prompts: the built-in arithmetic task or a JSONL file, chat template and system prompt",
    "checkpoint": "when checkpoints are saved (time, step or both) and how many are kept",
    "hardware": "device, dtype, threads, micro-batches, gradient checkpointing",
    "output": "what a run writes (metrics.jsonl, samples.jsonl) and whether progress bars show",
    "logger": "experiment trackers: jsonl always, plus tensorboard, wandb, mlflow (or all)",
    "paths": "where run folders land",
    "experiment": "presets that set several groups at once (experiments/*.yaml)",
    "debug": "quick checks (debug=fast: three small updates)",
}


def options_of(folder: Path) -> list[str]:
    """The options a user picks in a group folder; files starting with ``_`` hold keys that
    several options share (pulled in through their defaults list) and are not options."""
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def help_config(conf_dir: Path, experiments_dir: Path) -> dict:
    """The ``hydra/help`` config node of so8t-train."""
    width = max(len(g) for g in GROUPS)
    lines = []
    for group, what in GROUPS.items():
        options = options_of(experiments_dir if group == "experiment" else conf_dir / group)
        lines.append(f"  {group:<{width}}  {what}")
        lines.append(f"  {'':<{width}}  options: {', '.join(options)}")
    groups = "\n".join(lines)
    return {
        "app_name": "so8t-train",
        "header": "so8t-train: PPO for causal LMs with SO(8) residual rotation adapters (or LoRA),\n"
                  "with atomic, resumable checkpoints. Re-run the same command to resume.\n",
        "footer": "Examples: so8t-train debug=fast | so8t-train experiment=tiny_lora seed=3 |\n"
                  "so8t-train -m seed=1,2,3 | so8t-train --cfg job (print the composed config).\n"
                  "Own presets: put a folder of YAML files on hydra.searchpath (see the README).\n"
                  "Hydra's own options: so8t-train --hydra-help\n",
        "template": "${hydra.help.header}\n"
                    "== Config groups (pick an option with GROUP=OPTION) ==\n"
                    f"{groups}\n\n"
                    "== Config (override any key with key=value) ==\n\n"
                    "$CONFIG\n"
                    "${hydra.help.footer}",
    }
