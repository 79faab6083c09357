"""docs/model_coverage.md against the installed transformers and the family table: one row per model type of
transformers' image-text-to-text mapping, the class that mapping loads, and "supported" exactly where a row of
the family table takes the type, naming those rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

from notice import families

COVERAGE = Path(__file__).resolve().parents[1] / "docs" / "model_coverage.md"
HEADER = ("model type", "class", "status", "families", "what it takes, needs, or why not")
STATUSES = ("supported", "not yet", "out of scope")


@dataclass(frozen=True)
class CoverageRow:
    model_type: str
    class_name: str
    status: str
    families: tuple[str, ...]  # the family-table rows named (`name` in backticks)


def cells(line: str) -> list[str]:
    """The cells of a markdown table line, stripped (no cell holds a `|`)."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def coverage_rows(text: str) -> dict[str, CoverageRow]:
    """The coverage table in `text` (the table whose header is HEADER), by model type; ValueError naming the line
    for a row with the wrong number of cells or an unknown status, and naming repeated model types."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and tuple(cells(line)) == HEADER]
    if len(starts) != 1:
        raise ValueError(f"expected one table with the header {' | '.join(HEADER)}, found {len(starts)}")
    rows: dict[str, CoverageRow] = {}
    repeated: list[str] = []
    for number, line in enumerate(lines[starts[0] + 2 :], start=starts[0] + 3):
        if not line.startswith("|"):
            break
        row = cells(line)
        if len(row) != len(HEADER):
            raise ValueError(f"line {number}: {len(row)} cells, the table has {len(HEADER)}: {line!r}")
        model_type, class_name, status, named, _ = row
        if status not in STATUSES:
            raise ValueError(f"line {number}: status {status!r} is none of {STATUSES}")
        model_type = model_type.strip("`")
        if model_type in rows:
            repeated.append(model_type)
        family_names = tuple(re.findall(r"`([^`]+)`", named))
        rows[model_type] = CoverageRow(model_type, class_name.strip("`"), status, family_names)
    if repeated:
        raise ValueError(f"model types with more than one row: {sorted(repeated)}")
    return rows


@pytest.fixture(scope="module")
def table() -> dict[str, CoverageRow]:
    return coverage_rows(COVERAGE.read_text())


def test_the_table_has_one_row_per_registered_model_type(table: dict[str, CoverageRow]) -> None:
    registered = set(MAPPING)
    missing = sorted(registered - set(table))
    unknown = sorted(set(table) - registered)
    assert not missing and not unknown, (
        f"{COVERAGE.name} is out of step with transformers' image-text-to-text mapping: "
        f"types without a row {missing}; rows of types transformers does not register {unknown}"
    )
    assert list(table) == sorted(table), f"{COVERAGE.name}: the rows are not sorted by model type"


def test_each_row_names_the_class_transformers_loads(table: dict[str, CoverageRow]) -> None:
    wrong = {
        t: (row.class_name, MAPPING[t]) for t, row in table.items() if t in MAPPING and row.class_name != MAPPING[t]
    }
    assert not wrong, f"{COVERAGE.name}: class in the table vs the one transformers loads: {wrong}"


def test_supported_is_exactly_what_the_family_table_takes(table: dict[str, CoverageRow]) -> None:
    taken = {t for row in families.families() for t in row.model_types}
    problems = []
    for model_type in sorted(taken):
        expected = sorted(f.name for f in families.families_for(model_type))
        row = table.get(model_type)
        if row is None or row.status != "supported" or sorted(row.families) != expected:
            got = None if row is None else (row.status, sorted(row.families))
            problems.append(f"{model_type}: expected supported by {expected}, the table has {got}")
    problems += [
        f"{t}: marked {row.status} naming {list(row.families)}, but no family-table row takes it"
        for t, row in table.items()
        if t not in taken and (row.status == "supported" or row.families)
    ]
    assert not problems, f"{COVERAGE.name} against notice/families.py:\n" + "\n".join(problems)


def test_the_parser_reads_rows_and_rejects_malformed_ones() -> None:
    head = "| " + " | ".join(HEADER) + " |\n|---|---|---|---|---|\n"
    good = head + "| `b` | `B` | supported | `x`; `y` (opt-in) | ... |\n| `a` | `A` | not yet | — | ... |\n\nafter"
    assert coverage_rows(good) == {
        "b": CoverageRow("b", "B", "supported", ("x", "y")),
        "a": CoverageRow("a", "A", "not yet", ()),
    }
    with pytest.raises(ValueError, match="line 3: 4 cells"):
        coverage_rows(head + "| `a` | `A` | supported |  `x` |\n")
    with pytest.raises(ValueError, match="status 'maybe'"):
        coverage_rows(head + "| `a` | `A` | maybe | — | ... |\n")
    with pytest.raises(ValueError, match=r"more than one row: \['a'\]"):
        coverage_rows(head + "| `a` | `A` | not yet | — | ... |\n| `a` | `A` | not yet | — | ... |\n")
    with pytest.raises(ValueError, match="found 0"):
        coverage_rows("| model | class |\n|---|---|\n")
