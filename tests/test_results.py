"""The committed reports under results/ stay what their CSVs render to with today's code."""

import shutil
from pathlib import Path

import pytest

from normlab.experiments import render
from normlab.experiments.recipe import VERDICTS

RESULTS = Path(__file__).resolve().parents[1] / "results"
FOLDERS = sorted(p.parent for p in RESULTS.glob("*/*/meta.json"))  # results/RECIPE/MODE


def _claim_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| **")]


def test_results_are_committed():
    assert FOLDERS, f"no exported results under {RESULTS}"


@pytest.mark.filterwarnings("error")  # a committed report renders without a warning
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_report_renders_from_its_csv(folder, tmp_path):
    for name in ("runs.csv", "meta.json"):
        shutil.copyfile(folder / name, tmp_path / name)
    committed = (folder / "report.md").read_text()
    rendered = render(tmp_path).read_text()
    rows = _claim_rows(committed)
    assert rows, f"{folder / 'report.md'} has no claims table"
    for row in rows:
        cells = [c.strip() for c in row.replace("\\|", "").strip("|").split("|")]
        assert len(cells) == 6 and cells[4] in VERDICTS, row
    assert rows == _claim_rows(rendered), (
        f"{folder.name}: the committed claims differ from what its runs.csv renders to now; "
        f"re-render with `normlab report {folder.relative_to(RESULTS.parent)}` and commit it")
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert figures == sorted(p.name for p in folder.glob("*.png"))
