"""The MANSU workbench in the browser: ``python app.py`` (or ``make app``, or ``workbench app``).

The Gradio face lives in the package (:mod:`workbench.faces.app`), so an installed
``workbench app`` starts the same page; this file is the checkout's entry point.
"""

if __name__ == "__main__":
    # First, before the imports that take seconds: where jemalloc is installed, Python restarts
    # under it (workbench.core.allocator says why; WORKBENCH_MALLOC=system keeps the C library's).
    from workbench.core.allocator import restart_under_app_allocator
    from workbench.core.errors import WorkbenchError

    try:
        restart_under_app_allocator()
    except WorkbenchError as exc:  # a misspelt or unsatisfiable $WORKBENCH_MALLOC
        raise SystemExit(f"error: {exc}") from None

from workbench.faces.app import build_app, main

__all__ = ["build_app", "main"]

if __name__ == "__main__":
    main()
