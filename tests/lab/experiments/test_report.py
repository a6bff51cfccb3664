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
    assert [(r["key"], r["point"], r["eval.test_acc"]) for r in rows] == [
        ("k1", "0", "0.5"), ("k1", "1", "0.75"), ("k2", "", "")]
    assert rows[2]["status"] == "failed" and rows[0]["config.norm"] == "fastnorm"


def test_csv_columns_have_distinct_names_when_a_metric_shares_a_settings_name(tmp_path):
    with Store.in_folder(tmp_path) as store:
        store.set_meta(settings={"recipe": "fastnorm", "quick": True, "seeds": 1,
                                 "dataset": "mnist"})
        store.record(Run("k1", {"kind": "train", "lr": 0.1, "seed": 0}, "done", 3.0,
                         [{"lr": 0.1, "wall_time": 1.5, "point": 7.0},
                          {"lr": 0.05, "wall_time": 2.5, "point": 8.0}]))
    text = runs_csv(tmp_path)
    header = text.splitlines()[0].split(",")
    assert len(header) == len(set(header))
    assert header == ["key", "config.kind", "config.lr", "config.seed", "status", "wall_time",
                      "point", "eval.lr", "eval.point", "eval.wall_time"]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["config.lr"], r["eval.lr"], r["wall_time"], r["eval.wall_time"], r["point"])
            for r in rows] == [("0.1", "0.1", "3.000", "1.5", "0"),
                               ("0.1", "0.05", "3.000", "2.5", "1")]
    (run,) = runs_from_csv(text)
    assert run.config == {"kind": "train", "lr": 0.1, "seed": 0} and run.history == [
        {"lr": 0.1, "wall_time": 1.5, "point": 7.0}, {"lr": 0.05, "wall_time": 2.5, "point": 8.0}]


def test_csv_exports_of_before_the_prefixes_still_read(tmp_path):
    """results/*/runs.csv committed on 2026-12-02: bare column names, lr and wall_time twice."""
    text = ("key,kind,lr,seed,status,wall_time,point,lr,test_acc,wall_time\n"
            "k1,train,0.1,0,done,3.000,0,0.1,0.5,1.5\n"
            "k1,train,0.1,0,done,3.000,1,0.05,0.75,2.5\n"
            "k2,train,0.2,0,failed,0.500,,,,\n")
    first, second = runs_from_csv(text)
    assert (first.config, first.status, first.wall_time) == (
        {"kind": "train", "lr": 0.1, "seed": 0}, "done", 3.0)
    assert first.history == [{"lr": 0.1, "test_acc": 0.5, "wall_time": 1.5},
                             {"lr": 0.05, "test_acc": 0.75, "wall_time": 2.5}]
    assert (second.config["lr"], second.status, second.history) == (0.2, "failed", [])


def test_report_renders_from_the_database_alone_and_says_what_is_missing(tmp_path):
    text = render(_folder_with_runs(tmp_path)).read_text()
    assert text.count("| **(") == 6  # one row per claim of the recipe
    assert "inconclusive" in text and "Quick mode" in text
    # quick mode's 18 runs per seed (3 arms); the synthetic keys match none of them
    assert "**Partial: 18 of the mode's 18 runs are missing**" in text
    assert "**quick mode**" in text and "0 of the mode's 18 runs finished" in text
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
    assert all(line.replace("\\|", "").count("|") == 7 for line in rows)
