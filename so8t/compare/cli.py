"""The ``so8t-compare`` command line (the options are described in :mod:`so8t.compare`)."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Sequence

from so8t.compare.comparison import COLUMNS, Comparison, compare, current_key
from so8t.compare.metrics import DEFAULT_METRIC
from so8t.compare.plot import plot
from so8t.compare.render import render_csv, render_json, render_markdown, render_table
from so8t.compare.text import display_path, short_error
from so8t.exit_codes import ExitCode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="so8t-compare",
        description="Compare SO8T runs (single runs and sweep jobs) found below the given folders.",
        epilog="Details, and the JSON layout: python -m pydoc so8t.compare",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folders to search for runs")
    parser.add_argument("--metric", action="append", metavar="NAME[:min|:max]",
                        help=f"metric to summarise (repeatable; default {DEFAULT_METRIC})")
    parser.add_argument("--sort", metavar="[-]KEY",
                        help="sort by a column, config key, metric (last value) or best:METRIC; "
                             "a leading - sorts descending")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose KEY matches VALUE (repeatable; wildcards allowed)")
    parser.add_argument("--format", choices=("table", "md", "csv", "json"), default="table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the metrics' curves of all runs")
    parser.add_argument("--width", type=int, default=None,
                        help="table width in columns (default: the terminal's, else 100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for spec in args.filter:
        if "=" not in spec or not spec.partition("=")[0].strip():
            print(f"so8t-compare: --filter {spec!r} must look like KEY=VALUE", file=sys.stderr)
            return ExitCode.REFUSED
    cmp = compare(args.paths, args.metric or [DEFAULT_METRIC], args.sort, args.filter)
    for skipped in cmp.skipped:
        print(f"so8t-compare: skipped {display_path(skipped.path.resolve())}: {skipped.reason}",
              file=sys.stderr)
    unknown = _unknown_keys(cmp, [s.partition("=")[0].strip() for s in args.filter]
                            + ([args.sort.lstrip("-+")] if args.sort else []))
    for key in unknown:
        print(f"so8t-compare: no run has a column, config key or metric named {key!r}", file=sys.stderr)

    if args.format == "json":
        text = render_json(cmp)
    elif args.format == "csv":
        text = render_csv(cmp)
    elif args.format == "md":
        text = render_markdown(cmp)
    else:
        width = args.width or shutil.get_terminal_size((100, 24)).columns
        text = render_table(cmp, width)
    sys.stdout.write(text)

    if args.plot:
        try:
            path = plot(cmp, args.plot)
        except ImportError:
            print("so8t-compare: --plot needs matplotlib (pip install \"so8t[plot]\")", file=sys.stderr)
            return ExitCode.REFUSED
        except OSError as exc:
            print(f"so8t-compare: cannot write {args.plot}: {short_error(exc)}", file=sys.stderr)
            return ExitCode.REFUSED
        print(f"so8t-compare: plot written to {path}", file=sys.stderr)
    # 1 (FAILED): nothing to compare was found below the given folders.
    return ExitCode.OK if cmp.found else ExitCode.FAILED


def _unknown_keys(cmp: Comparison, keys: Sequence[str]) -> list[str]:
    """Keys of --filter/--sort that no run found has (typos would otherwise filter silently)."""
    if not cmp.found:
        return []
    known = set(COLUMNS) | {"path"} | cmp.known_keys
    known |= {f"best:{k}" for k in cmp.known_keys}
    return [k for k in dict.fromkeys(keys) if current_key(k) not in known]

