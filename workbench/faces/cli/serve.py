"""``app``: the Gradio app (:mod:`workbench.faces.app`) from the installed package.

The app runs in its own Python process, as ``python app.py`` does: importing Gradio takes
seconds, which every other command would otherwise pay at start-up. Every flag after
``app`` goes to the app's own parser (``workbench app --help`` lists them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from workbench.core.allocator import app_allocator_environment
from workbench.faces.cli.common import Printer

APP_LAUNCHER = "import sys; from workbench.faces.app import main; main(sys.argv[1:], prog='workbench app')"
"""The child process: the app's ``main`` with the flags given after ``workbench app``."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", add_help=False, help="start the Gradio app (workbench app --help for its flags)",
                       description="Start the Gradio app; every flag goes to the app (--model, --host, --port, ...).")
    p.set_defaults(func=cmd_app, passes_extra_args=True)


def cmd_app(args: argparse.Namespace, out: Printer) -> int:
    # the app's process under jemalloc where it is installed, as `python app.py` restarts itself
    env = app_allocator_environment(os.environ)
    try:
        return subprocess.call([sys.executable, "-c", APP_LAUNCHER, *args.extra_args], env=env)
    except KeyboardInterrupt:
        return 0  # Ctrl-C reached the app too (same terminal): it has stopped
