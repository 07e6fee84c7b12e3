"""``so8t-export SOURCE --out DIR``: a trained policy as a standard Hugging Face folder.

Exit codes: 0 written; 2 refused (a bad source, an existing --out without --force, a policy
that cannot be merged exactly, a full disk …), with a message and nothing written; 1 an
unexpected failure (traceback on stderr).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from so8t.exit_codes import ExitCode


def _parser() -> argparse.ArgumentParser:
    from so8t.export.options import DTYPE_NAMES, LAYOUTS

    parser = argparse.ArgumentParser(
        prog="so8t-export",
        description="Export a trained SO8T policy as a standard Hugging Face model or PEFT adapter.",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="a run folder (its final/), a final/ folder, a checkpoint folder "
                             "(checkpoints/step_…) or a run's checkpoints/ folder (its LATEST)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist)")
    parser.add_argument("--merge", action="store_true",
                        help="write a full model with the adapter merged in (same as --format merged); "
                             "SO(8) runs are always merged")
    parser.add_argument("--format", choices=LAYOUTS, default="auto", dest="layout",
                        help="peft: a PEFT adapter folder (LoRA runs); merged: a full model; "
                             "auto (default): peft for LoRA, merged for SO(8)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="dtype of the written weights (the merge is computed in float32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default="cpu", help="device to rebuild the policy on (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.merge and args.layout == "peft":
        print("so8t-export: --merge and --format peft contradict each other; choose one", file=sys.stderr)
        return ExitCode.REFUSED
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("so8t").setLevel(logging.INFO)

    from so8t.export import ExportError, export_policy

    try:
        result = export_policy(
            args.source, args.out, layout="merged" if args.merge else args.layout, dtype=args.dtype,
            force=args.force, device=args.device, command=shlex.join(["so8t-export", *argv]),
        )
    except ExportError as exc:
        print(f"so8t-export: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    print(f"so8t-export: wrote {result.layout} export to {result.out}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
