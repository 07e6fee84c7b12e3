"""Writes docs/config-reference.md from the schema and the shipped YAML files.

``python -m so8t.config.reference`` rewrites the file; ``--check`` exits 1 when it is out of date
(tests/test_docs.py runs the check). For every group option: each key with its type, choices
and range (from the dataclass schema, so8t.config.schema), its default (the value the option
composes to, from the YAML file) and the comment that the YAML file carries above it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from so8t.config import CONF_DIR, register, schema
from so8t.config.help import GROUPS, options_of
from so8t.config.typed import schema_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*)$")

def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """The file's opening comment and ``{"dotted.key": "the comment lines right above it"}``.

    When the first key follows the opening comment with no blank line, its own comment is the
    last line of that block (the files are written that way)."""
    header: list[str] | None = None
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not text.startswith("@package"):
                pending.append(text)
            continue
        match = _KEY.match(line)
        if header is None:
            # A defaults list right after the opening comment has no comment of its own.
            own_comment = match and match.group(2) != "defaults"
            header, pending = (pending[:-1], pending[-1:]) if own_comment else (pending, [])
        if not match:
            if not stripped:
                pending = []
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        if pending:
            comments[dotted] = " ".join(pending)
        pending = []
        stack.append((indent, key))
    return " ".join(header or []), comments


def _nested_option_comments(path: Path) -> dict[str, str]:
    """Comments of the options an option file picks from a group of its own folder
    (conf/ppo/default.yaml's ``optimizer: adamw`` is conf/ppo/optimizer/adamw.yaml), by their key."""
    found: dict[str, str] = {}
    for entry in OmegaConf.load(path).get("defaults", []) or []:
        if not OmegaConf.is_dict(entry):
            continue
        for group, option in entry.items():
            nested = path.parent / str(group) / f"{option}.yaml"
            if nested.is_file():
                found.update({f"{group}.{k}": v for k, v in yaml_comments(nested)[1].items()})
    return found


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + (" or null" if len(rest) < len(args) else "")
    if origin in (list, typing.List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (dict, typing.Dict):
        return "dict"
    if tp is typing.Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(member.value for member in tp)
    return getattr(tp, "__name__", str(tp))


def _schema_types(cls: Any, prefix: str = "") -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_schema_types(tp, f"{prefix}{f.name}."))
        else:
            valid = f.metadata.get("range")
            out[f"{prefix}{f.name}"] = _type_name(tp) + (f", {valid.describe()}" if valid else "")
    return out


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value: Any) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, list):
        text = "[" + ", ".join("null" if v is None else str(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = OmegaConf.to_yaml(value).strip().replace("\n", ", ") if value else "{}"
    else:
        text = str(value)
    if isinstance(value, bool):
        text = str(value).lower()
    text = text.replace("\n", " ").replace("|", "\\|")
    return f"`{text}`" if text else "`''`"


def _base_of(path: Path) -> Path | None:
    """The file of the same group that this option extends through its defaults list, if any."""
    for entry in OmegaConf.load(path).get("defaults") or []:
        if isinstance(entry, str) and (path.parent / f"{entry}.yaml").is_file():
            return path.parent / f"{entry}.yaml"
    return None


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {c.replace('|', chr(92) + '|')} |" for k, t, d, c in rows]
    return lines


def render() -> str:
    register()
    out = [
        "# Config reference",
        "",
        "Generated by `python -m so8t.config.reference` from the dataclass schema",
        "(`so8t/config/schema.py`) and the comments of the shipped YAML files (`conf/`); do not edit by hand.",
        "Each default is the value the option composes to (the YAML file is where it lives); the type",
        "column lists the choices and the valid range that every run checks. Pick an option with",
        "`GROUP=OPTION`, set a key with `GROUP.KEY=VALUE`, print the whole composed config with",
        "`so8t-train --cfg job`.",
        "",
        "## Top-level keys (`conf/train.yaml`)",
        "",
    ]
    top = OmegaConf.to_container(_compose([]), resolve=False)
    _, comments = yaml_comments(CONF_DIR / "train.yaml")
    types = {k: v for k, v in _schema_types(schema.TrainConfig).items() if "." not in k}
    out += _table([(k, types.get(k, "any"), _cell(top[k]), comments.get(k, "")) for k in types
                   if k in top and not isinstance(top[k], dict)])
    for group, what in GROUPS.items():
        if group in ("experiment", "debug"):
            continue
        out += ["", f"## `{group}`: {what}", ""]
        shown: set[str] = set()
        for option in options_of(CONF_DIR / group):
            path = CONF_DIR / group / f"{option}.yaml"
            node = OmegaConf.to_container(_compose([f"{group}={option}"])[group], resolve=False)
            types = _schema_types(schema_of(group, node))
            # An option that extends another file of its group (logger=wandb extends
            # logger/default.yaml, checkpoint=step extends checkpoint/_common.yaml) shares its comments.
            base = _base_of(path)
            comments = yaml_comments(base)[1] if base else {}
            header, own = yaml_comments(path)
            comments.update(own)
            comments.update(_nested_option_comments(path))
            if base is not None and base.stem.startswith("_") and base.stem not in shown:
                shown.add(base.stem)
                base_header, _ = yaml_comments(base)
                out += [f"### Keys every `{group}` option shares (`{group}/{base.name}`)", ""]
                if base_header:
                    out += [base_header, ""]
                shared = _leaves(OmegaConf.to_container(OmegaConf.load(base)))
                out += _table([(k, types.get(k, "any"), _cell(node.get(k, v)), comments.get(k, ""))
                               for k, v in shared.items()])
                out.append("")
            out += [f"### `{group}={option}`", ""]
            if header:
                out += [header, ""]
            leaves = _leaves(node)
            if base is not None:
                if base.stem.startswith("_"):
                    inherited = _leaves(OmegaConf.to_container(OmegaConf.load(base)))
                    out += [f"The keys of `{group}/{base.name}`, and:", ""]
                else:
                    inherited = _leaves(OmegaConf.to_container(_compose([f"{group}={base.stem}"])[group],
                                                               resolve=False))
                    out += [f"As `{group}={base.stem}`, except:", ""]
                leaves = {k: v for k, v in leaves.items() if k not in inherited or inherited[k] != v}
            out += _table([(k, types.get(k, "any"), _cell(v), comments.get(k, "")) for k, v in leaves.items()])
            out.append("")
    out += ["## Presets", "", "`experiment=NAME` (files in `experiments/`) and `debug=fast` set keys of several",
            "groups at once; each file starts with the command that runs it and says what it changes.", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m so8t.config.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config-reference.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python -m so8t.config.reference", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
