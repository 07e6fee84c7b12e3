"""``so8t.model`` is the bottom of the stack: it may not import the layers built on it, or a
change there could break model code through an import cycle or drag training code into inference."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import so8t.model

# The packages and modules above so8t.model.
ABOVE_MODEL = ("so8t.build", "so8t.ppo", "so8t.run", "so8t.recipe", "so8t.checkpoint", "so8t.final_policy",
               "so8t.export", "so8t.train")


def test_no_model_module_imports_a_layer_above_it():
    modules = sorted(f"so8t.model.{m.name}" for m in pkgutil.iter_modules(so8t.model.__path__))
    assert "so8t.model.policy" in modules and "so8t.model.so8" in modules  # the walk found them
    # One fresh interpreter: each module is imported in turn and charged with what it pulled in.
    code = f"""
import importlib, json, sys
above = {ABOVE_MODEL!r}
found = {{}}
for name in {modules!r}:
    before = set(sys.modules)
    importlib.import_module(name)
    found[name] = sorted(m for m in set(sys.modules) - before if m.startswith(above))
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(found) == set(modules)
    assert {name: pulled for name, pulled in found.items() if pulled} == {}
