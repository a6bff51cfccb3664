import csv
import io

import pytest

from normlab.experiments import Store, render, runs_csv
from normlab.experiments.store import Run


def _folder_with_runs(tmp_path):
    with Store.in_folder(tmp_path) as store:
        store.set_meta(settings={"recipe": "fastnorm", "quick": True, "seeds": 1,
                                 "dataset": "mnist"})
        store.record(Run("k1", {"kind": "train", "norm": "fastnorm", "lr": 0.03, "seed": 0,
                                "dtype": "float32", "batch_size": 1}, "done", 2.0,
                         [{"test_acc": 0.5}, {"test_acc": 0.75}]))
        store.record(Run("k2", {"kind": "train", "norm": "normprop", "lr": 0.07, "seed": 0,
                                "dtype": "float32", "batch_size": 1}, "failed", 0.5, [],
                         "Traceback\nRuntimeError: out of memory"))
    return tmp_path


def test_csv_has_a_row_per_evaluation_point(tmp_path):
    rows = list(csv.DictReader(io.StringIO(runs_csv(_folder_with_runs(tmp_path)))))
    assert [(r["key"], r["point"], r["test_acc"]) for r in rows] == [
        ("k1", "0", "0.5"), ("k1", "1", "0.75"), ("k2", "", "")]
    assert rows[2]["status"] == "failed" and rows[0]["norm"] == "fastnorm"


def test_report_renders_from_the_database_alone_and_says_what_is_missing(tmp_path):
    text = render(_folder_with_runs(tmp_path)).read_text()
    assert text.count("| **(") == 5  # one row per claim of the recipe
    assert "inconclusive" in text and "Quick mode" in text
    assert "## Failed runs" in text and "RuntimeError: out of memory" in text
    assert all((tmp_path / name).stat().st_size > 0 for name in
               ["fastnorm_accuracy.png", "fastnorm_stability.png", "fastnorm_variants.png"])


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no results database .*`normlab reproduce"):
        render(tmp_path)


def test_norm_bars_in_claims_do_not_split_table_cells(tmp_path):
    text = render(_folder_with_runs(tmp_path)).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| **")]
    assert all(line.replace("\\|", "").count("|") == 6 for line in rows)
