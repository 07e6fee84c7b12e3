"""Shared pieces of the PPO throughput benchmark (stdlib only: both environments import it).

Identical work on both sides means the same model folder, the same prompts, the same
settings and the same reward. The reward is a cheap function of the response tokens:
the fraction of response tokens that are the digit 7 (``REWARD_TOKEN``). SO8T receives
it as a reward function of the decoded text, TRL as a ``nn.Module`` reward "model" that
computes the same fraction from token ids.
"""

from __future__ import annotations

import json
import resource
import sys

# The two benchmark configurations (hidden size, layers, rollout batch, response
# length); both use 4 PPO epochs over one mini-batch (= one optimizer step per epoch).
CONFIGS: dict[str, dict] = {
    "small": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                  batch=8, response=16, ppo_epochs=4, mini_batches=1),
    "medium": dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=512,
                   batch=16, response=64, ppo_epochs=4, mini_batches=1),
    # Phi-3 shaped: the full 32064-row vocabulary and Phi-3.5 tokenizer, SO(8) adapters on the last
    # quarter of the layers (as the Phi-3.5 preset: 8 of 32), 64-token prompts (a chat-templated
    # question). Compares SO8T with itself: frozen-prefix reuse and chunked passes on and off (no
    # TRL side). At this width lm_head is ~27 % of a forward's multiply-adds (2.7 % in Phi-3.5-mini),
    # and prefix reuse does not shorten lm_head: the gain here understates the real model's.
    "phi3": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, vocab=32064,
                 batch=8, response=32, prompt_tokens=64, ppo_epochs=4, mini_batches=1, rollout_chunk=2,
                 adapter_layers=[-3, -2, -1]),
}

# Settings both sides share: the PPO knobs of conf/ppo/default.yaml, one learning rate for both.
LEARNING_RATE = 1e-3
KL_COEF = 0.05
CLIP_RANGE = 0.2
CLIP_RANGE_VALUE = 0.2
VF_COEF = 0.1
GAMMA = 1.0
LAM = 0.95
TEMPERATURE = 1.0
MISSING_EOS_PENALTY = 1.0
LORA_R = 8
LORA_ALPHA = 16.0
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
REWARD_TOKEN = "7"


def rss_now_mb() -> float:
    """Current resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Hand the result to the driver: one JSON line on stdout, marked."""
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def summarise(times: list[float], cpu_times: list[float], episodes: list[int], tokens: list[int],
              warmup: int) -> dict:
    """Throughput over the timed updates (those after ``warmup``).

    ``cpu_times`` (process CPU seconds per update) are reported alongside wall time: on a
    shared machine they show whether a slow round was slow work or a busy neighbour."""
    t, c, e, k = times[warmup:], cpu_times[warmup:], episodes[warmup:], tokens[warmup:]
    seconds = sum(t)
    return dict(
        timed_updates=len(t),
        seconds=seconds,
        episodes_per_s=sum(e) / seconds if seconds else float("nan"),
        tokens_per_s=sum(k) / seconds if seconds else float("nan"),
        mean_response_tokens=sum(k) / max(1, sum(e)),
        cpu_seconds=sum(c),
        episodes_per_cpu_s=sum(e) / sum(c) if sum(c) else float("nan"),
        update_times=t,
    )
