"""The command-line face: ``workbench <command> ...`` (or ``python -m workbench``). Thin:
every number comes from the core.

One module per group of commands, each adding its own subcommands: :mod:`.models` (models,
build, demo), :mod:`.measure` (eval, quant-report, bench), :mod:`.circuits` (attribute,
circuit), :mod:`.runs` (unlearn, runs, report, probe), :mod:`.comparisons` (compare,
paper-table, ablate) and :mod:`.serve` (app); :mod:`.common` holds what they share and
:mod:`.entry` the parser and :func:`main`.
"""

from workbench.faces.cli.entry import build_parser, main

__all__ = ["build_parser", "main"]
