"""Experiment presets (`so8t-train experiment=NAME`), shipped inside the package as so8t.experiments."""
