"""The plumbing that has one home: sizes, smoothing, atomic files, CSV lines, the data-folder rule."""

from __future__ import annotations

import csv
import io
import math

import pytest

from ursa.errors import UrsaError
from ursa.util.files import (FORMULA_START, atomic_path, atomic_write_csv, check_outside, csv_cell, csv_cell_value, csv_line,
                             csv_row_values, csv_text)
from ursa.util.numbers import human_bytes, parse_bytes, smooth, smooth_last


@pytest.mark.parametrize("text,n", [("20MB", 20 * 1024**2), ("500KB", 500 * 1024), ("1.5GB", int(1.5 * 1024**3)),
                                    ("2MiB", 2 * 1024**2), ("1000000", 1000000), (" 5 b ", 5), (7, 7)])
def test_parse_bytes_one_grammar(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "MB", "-1KB", "0", "1 TB", "ten"])
def test_parse_bytes_says_what_was_expected(text):
    with pytest.raises(UrsaError, match="--max-bytes .*expected"):
        parse_bytes(text)


def test_human_bytes():
    assert human_bytes(12) == "12 bytes" and human_bytes(1536) == "1.5 KB" and human_bytes(3 * 1024**2) == "3 MB"


def test_smooth_is_fastais_debiased_average_and_skips_nan():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth([1.0, math.nan, 3.0], beta=0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx((0.25 + 1.5) / 0.75)
    assert smooth_last([1.0, 3.0], beta=0.5) == pytest.approx(smooth([1.0, 3.0], beta=0.5)[-1])
    assert math.isnan(smooth_last([]))


def test_atomic_path_replaces_in_one_rename_or_leaves_nothing(tmp_path):
    target = tmp_path / "a.gif"
    with atomic_path(target, keep_suffix=True) as tmp:
        assert tmp.suffix == ".gif" and tmp.parent == tmp_path and tmp.name.startswith(".a.gif.")
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]


def test_csv_lines_quote_what_needs_quoting():
    line = csv_line(["a,b", 'say "hi"', 3])
    assert next(csv.reader(io.StringIO(line))) == ["a,b", 'say "hi"', "3"]
    assert csv_line(["x"], end="") == "x"


def test_a_cell_with_a_line_break_is_quoted_whatever_the_line_end():
    for end in ("\n", ""):
        line = csv_line(["a\rb", "c\nd", "e"], end=end)
        assert next(csv.reader(io.StringIO(line, newline=""))) == ["a\rb", "c\nd", "e"]


def test_atomic_write_csv(tmp_path):
    p = atomic_write_csv(tmp_path / "t.csv", ["name", "n"], [["a", 1], ["b,c", 2]])
    assert list(csv.reader(p.open())) == [["name", "n"], ["a", "1"], ["b,c", "2"]]


FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "-1.jpg", "-neg/0.png", "=", "-"]


@pytest.mark.parametrize("text", FORMULAS)
def test_formula_like_cells_are_escaped_and_read_back(text):
    """OWASP's CSV-injection advice: a leading ' makes a spreadsheet show the text instead of running it."""
    line = csv_line([text, "ok"])
    cell = next(csv.reader(io.StringIO(line)))[0]
    assert cell == "'" + text and not cell.startswith(FORMULA_START)
    assert csv_cell_value(cell) == text
    assert csv_cell(cell) == cell, "escaping is idempotent: a reader that rewrites what it read adds no quotes"


@pytest.mark.parametrize("value", ["plain", "a=b", "", "'quoted", "-0.5", "-1e-05", "+3", "-inf", -2.5, 7, None])
def test_ordinary_cells_and_numbers_are_written_as_they_are(value):
    cell = next(csv.reader(io.StringIO(csv_line([value]))), [""])[0]
    assert cell == ("" if value is None else str(value))
    assert csv_cell_value(cell) == cell


def test_every_csv_writer_escapes_and_the_readers_helper_undoes_it(tmp_path):
    rows = [["=HYPERLINK(\"http://x\")", -1.5], ["@x", "y"]]
    for text in (csv_text(["name", "n"], rows), atomic_write_csv(tmp_path / "t.csv", ["name", "n"], rows).read_text()):
        got = list(csv.reader(io.StringIO(text)))
        assert [c for r in got for c in r if c.startswith(FORMULA_START)] == ["-1.5"]  # a number is not a formula
        assert [csv_row_values(r) for r in got[1:]] == [["=HYPERLINK(\"http://x\")", "-1.5"], ["@x", "y"]]


def test_outputs_never_go_inside_the_data_folder(tmp_path):
    check_outside(tmp_path / "out", tmp_path / "data")
    for bad in (tmp_path / "data", tmp_path / "data" / "run"):
        with pytest.raises(UrsaError, match="outside the data folder"):
            check_outside(bad, tmp_path / "data")
