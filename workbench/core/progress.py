"""Progress reporting: one callback type, and the adapters every long loop shares.

Long work in the workbench takes an optional ``progress(fraction, message)`` callback
(:data:`Progress`). A face passes its own (Gradio's progress bar, the widget's label, the
CLI's :class:`ProgressBar`); without one, :class:`Steps` draws a tqdm bar on stderr, so a
script or notebook still sees that something is happening.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

Progress = Callable[[float, str], None]
"""``progress(fraction in [0, 1], message)``."""

T = TypeVar("T")


def silent(_fraction: float, _message: str) -> None:
    """A :data:`Progress` that reports nothing."""
    return None


def scaled(progress: Progress | None, lo: float, hi: float) -> Progress:
    """A callback for a sub-task that fills ``[lo, hi]`` of ``progress``'s range."""
    report = progress or silent
    return lambda fraction, message: report(lo + (hi - lo) * fraction, message)


class Steps:
    """Count ``total`` steps: report each to ``progress``, or draw a tqdm bar when it is None."""

    def __init__(self, total: int, desc: str, progress: Progress | None = None, *, leave: bool = False,
                 unit: str = "it") -> None:
        from tqdm.auto import tqdm  # tqdm.auto picks the notebook bar in Jupyter; imported when a bar is drawn

        self.total, self.done, self.progress, self.desc = max(1, total), 0, progress, desc
        self._bar: Any = tqdm(total=self.total, desc=desc, disable=progress is not None, leave=leave, unit=unit)

    def step(self, message: str = "", n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        if self.progress is not None:
            self.progress(min(1.0, self.done / self.total), message or self.desc)

    def postfix(self, **values: Any) -> None:
        """Numbers shown beside the tqdm bar (ignored when a callback reports instead)."""
        self._bar.set_postfix(**values)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def each(items: Sequence[T], desc: str, progress: Progress | None = None, *, unit: str = "it") -> Iterator[T]:
    """Yield ``items``, reporting ``desc: item`` to ``progress`` before each (and ``desc: done`` at
    the end), or through a tqdm bar when ``progress`` is None."""
    if progress is None:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, leave=False, unit=unit)
        return
    for i, item in enumerate(items):
        progress(i / max(len(items), 1), f"{desc}: {item}")
        yield item
    progress(1.0, f"{desc}: done")


class ProgressBar:
    """A :data:`Progress` callback drawn as one tqdm bar on stderr (the CLI's)."""

    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=1000, desc=desc, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        self._bar.n = int(1000 * min(1.0, max(0.0, fraction)))
        self._bar.set_postfix_str(message[:80], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
