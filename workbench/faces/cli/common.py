"""What every command group shares: flags, the split and quantizer they name, output and progress.

Output. A command writes what it found through a :class:`Printer`: ``line`` for people,
``json`` for ``--json``. Under ``--json`` :func:`workbench.faces.cli.entry.main` sends every
other write to stdout (a library's print, a table printed as it is measured) to stderr, so
stdout holds exactly one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.data.files import FILE_FORMATS, load_fact_file
from workbench.experiments.jobs import Job
from workbench.experiments.store import Run
from workbench.experiments.sweep import EXECUTORS, ExecutorConfig, RunCallback
from workbench.experiments.tracking import TRACKERS, Tracker, TrackingConfig, open_tracker
from workbench.models.builtin_splits import builtin_split
from workbench.models.loaded import LoadedModel
from workbench.quant import QuantConfig
from workbench.unlearning.readings import LoopReadings

QUANT_CHOICES = ("nf4", "fp4", "int8", "none")

# Exit codes (documented in ``workbench --help``).
EXIT_OK = 0
EXIT_USER_ERROR = 1
"""The input was refused (:class:`WorkbenchError`): the message says what to change."""
EXIT_USAGE = 2
"""argparse's code for a malformed command line."""
EXIT_INTERRUPTED = 130


class Printer:
    """Where a command's results go: text lines for people, or one JSON document."""

    def __init__(self, *, as_json: bool, stream: TextIO) -> None:
        self.as_json = as_json
        self._stream = stream

    def line(self, text: str = "") -> None:
        """A line for people (nothing under ``--json``)."""
        if not self.as_json:
            print(text, file=self._stream, flush=True)

    def json(self, data: object) -> None:
        """The machine-readable result (only under ``--json``). Non-finite numbers are
        written as null: NaN and Infinity are not JSON."""
        if self.as_json:
            print(json.dumps(_finite(data), indent=2, allow_nan=False, default=_plain), file=self._stream, flush=True)


def _finite(data: object) -> object:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _plain(obj: object) -> object:
    """JSON for the few non-JSON values results hold (paths, numpy/torch scalars)."""
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)
    if callable(item):
        return _finite(item())
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


class Bar:
    """A ``progress(fraction, message)`` callback drawn as one tqdm bar on stderr."""

    def __init__(self, desc: str) -> None:
        self._bar = tqdm(total=1000, desc=desc, file=sys.stderr,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        self._bar.n = int(1000 * min(1.0, max(0.0, fraction)))
        self._bar.set_postfix_str(message[:80], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


# --------------------------------------------------------------------------- flags


class DeprecatedSpelling(argparse.Action):
    """An old name of a flag: still works, stores into the new flag's value, and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"warning: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_runs_root(p: argparse.ArgumentParser, *old: str, what: str = "runs directory") -> None:
    """``--runs-root DIR`` (every command that reads or saves runs), with ``old`` spellings deprecated."""
    p.add_argument("--runs-root", metavar="DIR", help=f"{what} (default: $WORKBENCH_RUNS or ./runs)")
    for flag in old:
        p.add_argument(flag, dest="runs_root", action=DeprecatedSpelling, new="--runs-root")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (progress and messages go to stderr)")


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """``--jobs N`` and ``--executor``: where a table's or sweep's jobs run (finished ones are skipped)."""
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N jobs at once in worker processes on this machine (default 1: in this process)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (this machine) or ray (tasks on the Ray cluster at $RAY_ADDRESS, else a local one)")


def executor_from_args(args: argparse.Namespace) -> ExecutorConfig:
    return ExecutorConfig(kind=args.executor, jobs=args.jobs)


def add_readings_arg(p: argparse.ArgumentParser) -> None:
    """``--readings-every N``: how often the gradient methods' loop also reads retain and Q(w+Δ)."""
    p.add_argument("--readings-every", type=int, default=LoopReadings.every, metavar="N",
                   help="gradient methods: every N steps (and at the last) also read retain top-1 on a "
                        f"{LoopReadings.retain_sample}-fact sample and forget/retain of Q(w+Δ), for the progress "
                        f"line and --report-to (default {LoopReadings.every}; 0: never; changes no result)")


def readings_from_args(args: argparse.Namespace) -> LoopReadings:
    """The readings ``--readings-every`` asks for (a bad value fails before any model loads)."""
    return LoopReadings(every=args.readings_every)


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    """``--report-to tensorboard|mlflow`` and where it writes."""
    p.add_argument("--report-to", choices=TRACKERS, metavar="{tensorboard,mlflow}",
                   help="also log each new run (config, per-step forget/retain, final metrics) to TensorBoard or "
                        "an MLflow file store")
    p.add_argument("--tracking-dir", metavar="DIR",
                   help="TensorBoard log directory or MLflow file store (default ./tensorboard or ./mlruns)")


def tracker_from_args(args: argparse.Namespace) -> Tracker | None:
    """The tracker asked for (its library imported now, so a missing one fails before any work)."""
    if not args.report_to:
        return None
    return open_tracker(TrackingConfig.of(args.report_to, args.tracking_dir))


def tracking_callback(tracker: Tracker | None) -> RunCallback | None:
    """``on_run`` for :func:`~workbench.experiments.sweep.run_jobs`: log each new run."""
    if tracker is None:
        return None

    def log(_job: Job, run: Run) -> None:
        tracker.log_run(run)

    return log


def add_quant_args(p: argparse.ArgumentParser, default: str = "nf4") -> None:
    p.add_argument("--quant", choices=QUANT_CHOICES, default=default, help="quantizer (default %(default)s)")
    p.add_argument("--blocksize", type=int, default=64, help="quantization block size (default 64)")
    p.add_argument("--double-quant", action="store_true",
                   help="also quantize the block scales (bnb compress_statistics)")


def add_data_args(p: argparse.ArgumentParser, *, forget_only: bool = False) -> None:
    p.add_argument("--forget", help="forget-set fact file (JSONL, CSV or Parquet); default: the model's built-in split")
    p.add_argument("--retain", help="not needed here: only the forget set is read" if forget_only
                   else "retain-set fact file (JSONL, CSV or Parquet)")
    p.add_argument("--format", choices=FILE_FORMATS, dest="data_format",
                   help="the fact files' row shape: cloze {prompt, answer}, mc {question, choices, answer index}, "
                        "qa {question, answer, ...}, text {text}; default: told from each row's fields")
    p.add_argument("--forget-domain", help="built-in split: which domain to forget")


def quant_from_args(args: argparse.Namespace, command: str) -> QuantConfig:
    """The quantizer asked for; ``--quant none`` is an error for commands that measure against one."""
    q = optional_quant(args)
    if q is None:
        raise WorkbenchError(f"{command} needs a quantizer: --quant nf4, fp4 or int8")
    return q


def optional_quant(args: argparse.Namespace) -> QuantConfig | None:
    if args.quant == "none":
        return None
    return QuantConfig(args.quant, blocksize=args.blocksize, double_quant=args.double_quant)


def load_split(model: LoadedModel, args: argparse.Namespace) -> FactSplit:
    """The split the user asked for: fact files if given (both), else the built-in one."""

    forget_file, retain_file = args.forget, args.retain
    if forget_file or retain_file:
        if not (forget_file and retain_file):
            raise WorkbenchError("give both --forget and --retain fact files (or neither for the built-in split)")
        fmt = getattr(args, "data_format", None)
        return FactSplit(name="user", forget=load_facts(model, forget_file, fmt),
                         retain=load_facts(model, retain_file, fmt))
    return builtin_split(model, forget_domain=args.forget_domain)


def load_forget_split(model: LoadedModel, args: argparse.Namespace, command: str) -> FactSplit:
    """A split for commands that read only the forget set (attribution, faithfulness):
    ``--forget FILE`` alone is enough (a ``--retain`` file beside it is not read)."""

    if args.forget:
        return FactSplit(name="user", forget=load_facts(model, args.forget, getattr(args, "data_format", None)),
                         retain=())
    if args.retain:
        raise WorkbenchError(f"{command} reads only the forget set: give --forget FILE (--retain is not needed)")
    return builtin_split(model, forget_domain=args.forget_domain)


def load_facts(model: LoadedModel, path: str, fmt: str | None = None) -> tuple[Fact, ...]:
    """A user's fact file, checked against the model's tokenizer and context (``fmt``: a row
    shape to force, see ``--format``)."""
    return tuple(load_fact_file(path, tokenizer=model.tokenizer, max_context=model.n_ctx, format=fmt))
