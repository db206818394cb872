"""Every row of docs/bad-input.md names a test that exists, so the table cannot claim more than is tested.

A row's last column lists tests as ``tests/path.py::test_name`` (a parametrised id may be left
out). Each named file must exist and define ``def test_name(``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "bad-input.md"
HEADER = ["input", "what the user sees", "test"]
TEST_ID = re.compile(r"`(?P<path>tests/[\w/]+\.py)::(?P<name>test_\w+)(?:\[[^\]`]*\])?`")


def cells(line: str) -> list[str]:
    """The cells of a Markdown table line; a ``|`` inside backticks is text, not a separator."""
    parts, current, in_code = [], "", False
    for char in line.strip().removeprefix("|").removesuffix("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def table_rows(text: str) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every body row of every table, checking each table's header."""
    rows, header = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line)
        if header is None:
            header = row
            assert header == HEADER, f"line {number}: a table's columns must be {HEADER}, got {header}"
        elif not all(set(cell) <= set(":-") for cell in row):
            rows.append((number, row))
    return rows


def missing_tests(test_cell: str) -> list[str]:
    """The tests a row's test column names that are not defined where it says (all, if it names none)."""
    named = list(TEST_ID.finditer(test_cell))
    if not named:
        return [f"no test named in {test_cell!r}"]
    missing = []
    for match in named:
        path = ROOT / match["path"]
        if not path.is_file() or not re.search(rf"^\s*def {match['name']}\(", path.read_text(), re.M):
            missing.append(f"{match['path']}::{match['name']}")
    return missing


ROWS = table_rows(PAGE.read_text())


def test_the_page_has_tables() -> None:
    assert ROWS, f"no table rows found in {PAGE}"


@pytest.mark.parametrize(("line", "row"), ROWS, ids=[f"line {line}" for line, _ in ROWS])
def test_every_row_names_tests_that_exist(line: int, row: list[str]) -> None:
    assert len(row) == len(HEADER), f"line {line} has {len(row)} cells: {row}"
    assert row[0] and row[1], f"line {line} has an empty input or message"
    assert missing_tests(row[2]) == [], f"line {line} ({row[0]}) names tests that do not exist"


def test_a_missing_test_or_an_empty_test_column_is_caught() -> None:
    real = "`tests/docs/test_bad_input_table.py::test_the_page_has_tables`"
    assert missing_tests(real) == []
    assert missing_tests(f"{real}, `tests/docs/test_bad_input_table.py::test_no_such_test[id]`") == [
        "tests/docs/test_bad_input_table.py::test_no_such_test"
    ]
    assert missing_tests("`tests/no_such_file.py::test_the_page_has_tables`") == [
        "tests/no_such_file.py::test_the_page_has_tables"
    ]
    assert missing_tests("same test") == ["no test named in 'same test'"]
    assert cells("| `a | b` | c | `tests/x.py::test_y` |") == ["`a | b`", "c", "`tests/x.py::test_y`"]
