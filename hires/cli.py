"""The ``hires`` command: ``hires {train,eval,plot,compare[,analyze]} ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args)``; this file only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# subcommand -> (module, help)
COMMANDS = {
    "train": ("hires.train", "train a model (also: python -m hires.train, torchrun -m hires.train)"),
    "eval": ("hires.evaluate", "evaluate a checkpoint on a test set"),
    "plot": ("hires.plot", "plot accuracy and loss per epoch of one or more runs"),
    "compare": ("hires.compare", "train a grid of runs or aggregate runs into a markdown table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hires", description="HiResNets: training and analysis")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or "").strip().split("\n")[0])
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    try:  # optional: the analysis tools (hires.analysis) register themselves when present
        analysis = importlib.import_module("hires.analysis")
    except ImportError:
        analysis = None
    if analysis is not None and hasattr(analysis, "add_arguments") and hasattr(analysis, "main"):
        p = sub.add_parser("analyze", help="analyse trained models (hires.analysis)")
        analysis.add_arguments(p)
        p.set_defaults(_module="hires.analysis")
    return parser


def main(argv=None) -> int:
    """Run ``hires ARGV``; returns the exit status. A :class:`~hires.errors.UserError`
    (a bad option, checkpoint, dataset or run folder) is one line on stderr and status 2."""
    from .errors import UserError

    args = build_parser().parse_args(argv)
    try:
        rc = importlib.import_module(args._module).main(args)
    except UserError as e:
        print(f"hires {args.command}: error: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
