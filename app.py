"""The MANSU workbench in the browser: ``python app.py`` (or ``make app``, or ``workbench app``).

The Gradio face lives in the package (:mod:`workbench.faces.app`), so an installed
``workbench app`` starts the same page; this file is the checkout's entry point.
"""

from workbench.faces.app import build_app, main

__all__ = ["build_app", "main"]

if __name__ == "__main__":
    main()
