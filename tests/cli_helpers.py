"""Run the ``xent`` command line in this process, as a test sees a subprocess run."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

from xent.tools.cli import main


def run_cli(*args: str) -> SimpleNamespace:
    """``xent ARGS`` in-process: ``returncode``, ``stdout`` and ``stderr`` (as text)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's errors, --help/--version, SystemExit("message")
            code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
            if isinstance(exc.code, str):  # what the interpreter prints on exiting with it
                err.write(exc.code + "\n")
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_subprocess(*args: str) -> subprocess.CompletedProcess:
    """``python -m xent ARGS`` in a fresh process: the one smoke test per command."""
    return subprocess.run(
        [sys.executable, "-m", "xent", *args], capture_output=True, text=True, timeout=300
    )
