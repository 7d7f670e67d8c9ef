"""Result tables: the four renderings show the same cells; the text histogram's bars."""

from __future__ import annotations

import csv
import html
import io
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from workbench.faces.tables import csv_table, html_table, markdown_table, text_histogram, text_table

ROWS = [
    {"set": "forget", "precision": "fp32", "n": 24, "top1": 1.0, "mc": 0.958333, "p(answer)": 0.91234, "ok": True},
    {"set": "retain", "precision": "nf4/b64", "n": 72, "top1": 0.5, "mc": float("nan"), "p(answer)": 0.00001234,
     "ok": False},
    {"set": "a|b", "precision": "int8/b64", "n": 3, "top1": np.float32(0.25), "mc": None, "p(answer)": 2.5e7,
     "ok": np.bool_(True)},
]
COLUMNS = ["set", "precision", "n", "top1", "mc", "p(answer)", "ok"]
EXPECTED = [
    ["forget", "fp32", "24", "1.000", "0.958", "0.912", "yes"],
    ["retain", "nf4/b64", "72", "0.500", "–", "1.23e-05", "no"],
    ["a|b", "int8/b64", "3", "0.250", "", "2.50e+07", "yes"],
]


def _markdown_cells(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    assert re.fullmatch(r"\|(---\|)+", lines[1]), lines[1]

    def split(line: str) -> list[str]:
        assert line.startswith("| ") and line.endswith(" |"), line
        parts = re.split(r"(?<!\\) \| ", line[2:-2])
        return [p.replace("\\|", "|") for p in parts]

    return split(lines[0]), [split(line) for line in lines[2:]]


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.header: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._tag = ""

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and self.header:
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell, self._tag = [], tag

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            (self.header if tag == "th" else self.rows[-1]).append("".join(self._cell))
            self._cell = None


def _text_cells(text: str, n_cols: int) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    dashes = [m.span() for m in re.finditer(r"-+", lines[1])]
    assert len(dashes) == n_cols

    def split(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in dashes]

    return split(lines[0]), [split(line) for line in lines[2:]]


def test_markdown_html_and_text_render_the_same_cells():
    md_head, md_rows = _markdown_cells(markdown_table(ROWS))
    assert md_head == COLUMNS and md_rows == EXPECTED

    parser = _Cells()
    parser.feed(html_table(ROWS))
    assert parser.header == COLUMNS and parser.rows == EXPECTED

    head, rows = _text_cells(text_table(ROWS), len(COLUMNS))
    assert head == COLUMNS and rows == EXPECTED


def test_markdown_escapes_pipes_so_the_column_count_holds():
    table = markdown_table([{"name": "x|y", "v|w": 1}])
    header, rows = _markdown_cells(table)
    assert header == ["name", "v|w"] and rows == [["x|y", "1"]]
    # every line has exactly the same number of unescaped separators
    counts = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
    assert counts == {3}


def test_csv_holds_the_same_cells_at_full_precision():
    rows = list(csv.reader(io.StringIO(csv_table(ROWS))))
    assert rows[0] == COLUMNS
    assert len(rows) == 1 + len(ROWS)
    for row, expected_row, source in zip(rows[1:], EXPECTED, ROWS):
        assert row[:3] == expected_row[:3]  # text and integers verbatim
        for col in ("top1", "mc", "p(answer)"):
            value, cell = source[col], row[COLUMNS.index(col)]
            if value is None:
                assert cell == ""
            elif math.isnan(float(value)):
                assert cell.lower() == "nan"
            else:
                assert float(cell) == pytest.approx(float(value), rel=1e-6)


def test_columns_argument_selects_and_orders_and_missing_cells_are_blank():
    rows = [{"a": 1, "b": 2.0}, {"b": 3.5, "c": "x"}]
    assert text_table(rows).splitlines()[0].split() == ["a", "b", "c"]
    header, cells = _markdown_cells(markdown_table(rows, columns=["c", "a"]))
    assert header == ["c", "a"] and cells == [["", "1"], ["x", ""]]
    assert csv_table(rows, columns=["b"]).splitlines() == ["b", "2.0", "3.5"]
    assert markdown_table([{"v": 0.123456}], digits=5).splitlines()[2] == "| 0.12346 |"


def test_text_table_aligns_columns():
    lines = text_table(ROWS).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert set(lines[1]) <= {"-", " "}


def test_html_escapes_cells():
    out = html_table([{"<b>": "a & <i>b</i>"}])
    assert "<b>" not in out.replace("<tbody>", "")
    assert "&lt;b&gt;" in out and "a &amp; &lt;i&gt;b&lt;/i&gt;" in out
    assert html.unescape(out).count("<i>b</i>") == 1


def test_text_histogram_bars_are_proportional_and_percentages_sum_to_100():
    counts = [0, 10, 20, 40]
    labels = ["code  0", "code  1", "code  2", "code  3"]
    out = text_histogram(counts, labels, width=40).splitlines()
    assert len(out) == 4
    bars = [line.count("█") for line in out]
    assert bars == [0, 10, 20, 40]  # the largest count fills the width
    percents = [float(re.search(r"([\d.]+)%$", line).group(1)) for line in out]
    assert percents == [0.0, 14.3, 28.6, 57.1]
    assert sum(percents) == pytest.approx(100.0, abs=0.2)
    assert all(line.startswith(label) for line, label in zip(out, labels))
    assert len({len(line) for line in out}) == 1  # bars padded to the width


def test_text_histogram_labels_right_aligned_and_all_zero_counts():
    out = text_histogram([0, 0], ["a", "long label"], width=10).splitlines()
    assert out[0].startswith("         a ") and out[1].startswith("long label ")
    assert all("█" not in line and line.endswith("0.0%") for line in out)
    # numpy counts (as bin_occupancy returns) work the same
    np_out = text_histogram(list(np.array([1, 3], dtype=np.int64)), ["x", "y"], width=12).splitlines()
    assert [line.count("█") for line in np_out] == [4, 12]
