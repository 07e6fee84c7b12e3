"""Hydra config groups of so8t-train, shipped inside the package as so8t.conf."""
