"""The parser and the entry point: ``workbench <command> ...`` (also ``python -m workbench``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from workbench import __version__
from workbench.core.errors import WorkbenchError
from workbench.faces.cli import circuits, comparisons, measure, models, runs, serve, sweep
from workbench.faces.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, Printer

EPILOG = """\
runs:
  RUN is a run id, looked up in --runs-root (default: $WORKBENCH_RUNS or ./runs), or a run's
  directory (the path `unlearn` prints), so runs from different roots can be reported and compared.

output:
  --json prints the result as one JSON document on stdout (a number that is not finite, such as
  NaN, is null); progress bars and messages go to stderr.

exit codes:
  0    success
  1    the input was refused: unknown model, run or file, a malformed fact file, ...
       (the reason is on stderr, after "error: ")
  2    the command line is malformed (unknown command or flag, missing argument)
  130  interrupted (Ctrl-C)
"""

GROUPS = (models, measure, circuits, runs, comparisons, sweep, serve)
"""Each group module adds its own subcommands (``add_commands``), in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MANSU workbench: circuit attribution, quantization-permanent unlearning and NF4 analysis")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # known args only: `workbench app` hands every flag after it to the app's own parser
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    out = Printer(as_json=getattr(args, "json", False), stream=sys.stdout)
    try:
        # under --json stdout is the JSON document alone: anything else printed goes to stderr
        with contextlib.redirect_stdout(sys.stderr) if out.as_json else contextlib.nullcontext():
            return int(args.func(args, out) or EXIT_OK)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `workbench runs | head`: the reader left; point stdout at /dev/null so Python's exit flush
        # does not raise again, and end quietly as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
