"""The choices of ``so8t-export`` (importable without torch, so ``--help`` and a bad option answer at once)."""

# peft: a PEFT adapter folder (LoRA only); merged: a full model; auto: peft for LoRA, merged for SO(8).
LAYOUTS = ("auto", "peft", "merged")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
