"""The ``xent`` command line: ``explain``, ``plot``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

import xent
from xent.tools._args import Parser, UsageError, one_line

# name -> (module in xent.tools, one-line help). Each module has add_arguments(parser) and
# run(args) -> int; heavy imports (matplotlib) wait inside run.
SUBCOMMANDS = {
    "explain": ("explain", "show every step of a loss: the seed examples or your numbers"),
    "plot": ("plots", "draw the figures that explain the losses (PNG files)"),
    "bench": ("bench", "time and peak memory of xent against torch and torch.compile"),
    "demo": ("demo", "train a small language model with xent and with torch, side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    parser = Parser(
        prog="xent",
        description=(
            "xent: exact, fast classification losses for PyTorch "
            "(cross-entropy, NLL, BCE, KL divergence, Huber, log_loss)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"xent {xent.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"xent.tools.{module_name}")
        child = sub.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(child)
        child.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xent`` console script; returns the process exit code."""
    if importlib.util.find_spec("rich") is None:
        sys.stderr.write("xent: the command-line tools need rich: pip install 'xent[tools]'\n")
        return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    prog = f"xent {args.command}"
    try:
        return args.run(args)
    except SystemExit as exc:  # a module's own message: one line, status 2
        if exc.code is None or isinstance(exc.code, int):
            raise
        sys.stderr.write(f"{prog}: error: {one_line(exc.code).removeprefix(prog + ': ')}\n")
        return 2
    except UsageError as err:
        sys.stderr.write(f"{prog}: error: {one_line(err)}\n")
        return 2
    except OSError as err:  # a file that cannot be written or read
        where = f" {err.filename!r}" if err.filename else ""
        sys.stderr.write(f"{prog}: error:{where} {one_line(err.strerror or err)}\n")
        return 1
    except Exception as err:
        sys.stderr.write(f"{prog}: error: {type(err).__name__}: {one_line(err)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
