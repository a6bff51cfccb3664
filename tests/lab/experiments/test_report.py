import csv
import io

import pytest

from normlab.experiments import Store, render, runs_csv
from normlab.experiments.report import export, runs_from_csv
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
    assert text.count("| **(") == 6  # one row per claim of the recipe
    assert "inconclusive" in text and "Quick mode" in text
    # quick mode's 18 runs per seed (3 arms); the synthetic keys match none of them
    assert "**Partial: 18 of the protocol's 18 runs are missing**" in text
    assert "## Failed runs" in text and "RuntimeError: out of memory" in text
    assert all((tmp_path / name).stat().st_size > 0 for name in
               ["fastnorm_accuracy.png", "fastnorm_stability.png", "fastnorm_variants.png"])


def test_csv_reads_back_the_runs_as_stored(tmp_path):
    folder = _folder_with_runs(tmp_path)
    with Store.in_folder(folder) as store:
        store.record(Run("k3", {"kind": "probe", "probe": "m.f", "seed": 2,
                                "params": {"width": 10, "scheme": "he", "quick": True}},
                         "diverged", 1.25, [{"ratio": 0.1, "step": 1.0}, {"ratio": 2.5}]))
        stored = store.runs()
    back = runs_from_csv(runs_csv(folder))
    assert [(r.key, r.config, r.status, r.history) for r in back] == \
        [(r.key, r.config, r.status, r.history) for r in stored]
    assert back[1].error == "(traceback not exported)" and back[0].error is None


def test_export_writes_csv_and_provenance_and_renders_from_them_alone(tmp_path):
    source = _folder_with_runs(tmp_path / "run")
    (source / "log.txt").write_text("k1 done\n")
    report = export(source, tmp_path / "results", commit="abc1234", machine="a 2-core VM",
                    date="2026-12-02")
    assert sorted(p.name for p in report.parent.iterdir() if p.suffix != ".png") == [
        "log.txt", "meta.json", "report.md", "runs.csv"]
    text = report.read_text()
    assert "Ran on a 2-core VM, 2026-12-02, code at commit `abc1234`" in text
    claims = [line for line in text.splitlines() if line.startswith("| **")]
    assert claims == [line for line in render(source).read_text().splitlines()
                      if line.startswith("| **")]


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no results database .*`normlab reproduce"):
        render(tmp_path)


def test_norm_bars_in_claims_do_not_split_table_cells(tmp_path):
    text = render(_folder_with_runs(tmp_path)).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| **")]
    assert all(line.replace("\\|", "").count("|") == 6 for line in rows)
