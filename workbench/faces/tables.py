"""Plain-text, Markdown, CSV and HTML renderings of result tables (lists of row dicts)."""

from __future__ import annotations

import csv
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _cell(value: Any, digits: int = 3) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    # numpy floats (np.float32 is no subclass of float) format like Python floats
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _md(text: str) -> str:
    """A Markdown table cell: a literal ``|`` would start a new column, a newline a new row."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(_md(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md(_cell(row.get(c), digits)) for c in cols) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Aligned columns for a terminal."""
    cols = _columns(rows, columns)
    cells = [[_cell(row.get(c), digits) for c in cols] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def csv_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    cols = _columns(rows, columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in cols})
    return buf.getvalue()


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    cols = _columns(rows, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c), digits))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def text_histogram(counts: Sequence[float], labels: Sequence[str], width: int = 40) -> str:
    """Horizontal bars, one per label (for bin occupancy in a terminal)."""
    top = max(counts) if len(counts) and max(counts) > 0 else 1
    total = sum(counts) or 1
    lw = max(len(label) for label in labels) if labels else 0
    return "\n".join(
        f"{label.rjust(lw)} {'█' * round(width * c / top):<{width}} {100 * c / total:5.1f}%"
        for label, c in zip(labels, counts)
    )
