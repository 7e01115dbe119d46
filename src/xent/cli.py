"""The ``xent`` command line: ``xent bench`` (and ``--version``, ``--help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import xent


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="xent",
        description=(
            "xent: exact, fast classification losses for PyTorch "
            "(cross-entropy, NLL, BCE, KL divergence, Huber, log_loss)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"xent {xent.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from xent import bench

    bench_parser = sub.add_parser(
        "bench",
        help="time and peak memory of xent against torch and torch.compile",
        description=bench.__doc__.split("\n\n")[0],
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xent`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
