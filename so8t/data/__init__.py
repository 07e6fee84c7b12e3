"""Prompt data: datasets built from config and the resumable index sampler."""

from so8t.data.prompts import Prompt, build_prompts
from so8t.data.sampler import PromptSampler

__all__ = ["Prompt", "PromptSampler", "build_prompts"]
