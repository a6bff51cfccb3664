import sqlite3

import pytest
import sweep_helper

from normlab import experiments


@pytest.fixture
def tiny(monkeypatch, needs_sklearn):
    recipe = sweep_helper.tiny_recipe()
    monkeypatch.setitem(experiments.RECIPES, recipe.name, recipe)
    return recipe


def test_reproduce_runs_and_reports_then_a_rerun_changes_nothing(tmp_path, tiny):
    path = experiments.reproduce("tiny", tmp_path, quick=True, workers=2)
    text = path.read_text()
    assert path == tmp_path / "report.md" and (tmp_path / "tiny.png").stat().st_size > 0
    assert "| **batch learns**: batch norm beats chance | > 10% |" in text
    assert "(n=2)" in text and "reproduced" in text and "2 seeds, 320 digits" in text
    assert "Runs in the database: 6 (6 done" in text
    dump = list(sqlite3.connect(tmp_path / "results.db").iterdump())
    experiments.reproduce("tiny", tmp_path, quick=True, workers=2)
    assert list(sqlite3.connect(tmp_path / "results.db").iterdump()) == dump


def test_results_of_other_settings_are_not_mixed(tmp_path, tiny):
    experiments.reproduce("tiny", tmp_path, quick=True, seeds=1, workers=1)
    with pytest.raises(ValueError, match="use another --out"):
        experiments.reproduce("tiny", tmp_path, quick=True, seeds=2, workers=1)


def test_a_method_not_registered_fails_before_any_run(tmp_path, monkeypatch):
    recipe = sweep_helper.tiny_recipe("needs-new", norms=("none", "not_yet_registered"))
    monkeypatch.setitem(experiments.RECIPES, recipe.name, recipe)
    with pytest.raises(ValueError, match="unknown normalization 'not_yet_registered'"):
        experiments.reproduce("needs-new", tmp_path, quick=True)
    assert not (tmp_path / "results.db").exists()


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match="expected one of .*fastnorm.*lecture"):
        experiments.get_recipe("fastnrom")
