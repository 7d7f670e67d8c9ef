"""The parser and the entry point: ``workbench <command> ...`` (also ``python -m workbench``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

from workbench import __version__
from workbench.core.device import DTYPE_ENV, DTYPES, WORKING_MB_ENV, working_budget_setting, working_mib
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
    parser.add_argument("--dtype", dest="model_dtype", choices=tuple(DTYPES), default=None,
                        help="storage dtype every model of this command is loaded in (default: $WORKBENCH_DTYPE, "
                             "else float32); updates still accumulate in float32")
    parser.add_argument("--working-mb", dest="working_mb", type=_positive_mib, default=None, metavar="MB",
                        help="working memory each step may take beside the model, in MiB (default: "
                             "$WORKBENCH_WORKING_MB, else a quarter of the model's bytes, at least 128; on a GPU "
                             "at most half of what the model leaves): smaller takes less memory and more passes, "
                             "the same numbers to float rounding")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def _positive_mib(text: str) -> int:
    try:
        return working_mib(text, "the budget")
    except WorkbenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@contextlib.contextmanager
def _settings(args: argparse.Namespace) -> Iterator[None]:
    """The global flags as the environment variables the library reads (``load_model`` the dtype,
    ``LoadedModel.working_budget_bytes`` the budget), for this command only: ``main`` is called
    in-process too (tests, notebooks), so what was there before is restored."""
    values = {DTYPE_ENV: args.model_dtype, WORKING_MB_ENV: None if args.working_mb is None else str(args.working_mb)}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        working_budget_setting()  # one set in the shell is checked before any model loads, as the flag is
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
        with _settings(args), contextlib.redirect_stdout(sys.stderr) if out.as_json else contextlib.nullcontext():
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
