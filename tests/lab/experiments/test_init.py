import csv
import dataclasses
import io
import sqlite3

import pytest
import sweep_helper

from normlab import data, experiments, training


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


def test_a_sweep_resumes_from_an_exported_folder_without_rerunning_its_runs(tmp_path, tiny):
    experiments.reproduce("tiny", tmp_path / "first", quick=True, seeds=2, workers=1)
    exported = tmp_path / "exported"
    experiments.export(tmp_path / "first", exported, commit="abc", machine="here")
    # a sweep cut short: the export holds seed 0's runs only
    header, *rows = csv.reader(io.StringIO((exported / "runs.csv").read_text()))
    seed = header.index("config.seed")
    out = io.StringIO()
    csv.writer(out).writerows([header] + [row for row in rows if row[seed] == "0"])
    (exported / "runs.csv").write_text(out.getvalue())
    said = []
    experiments.reproduce("tiny", tmp_path / "second", quick=True, seeds=2, workers=1,
                          resume_from=exported, say=said.append)
    with experiments.Store.in_folder(tmp_path / "first") as store:
        first = {r.key: r for r in store.runs() if r.config["seed"] == 0}
    with experiments.Store.in_folder(tmp_path / "second") as store:
        second = {r.key: r for r in store.runs()}
    assert said == [f"resumed from {exported}: 3 finished runs copied, 0 left "
                    f"(already here, failed, or not in this recipe)"]
    assert len(first) == 3 and len(second) == 6 and set(first) < set(second)
    for key, run in first.items():  # copied, not rerun: a rerun would time differently
        copied = second[key]
        assert copied.wall_time == round(run.wall_time, 3) and copied.history == run.history
    assert {second[k].config["seed"] for k in set(second) - set(first)} == {1}
    # the log keeps the first sweep's lines, then the new runs'
    first_log = (exported / "log.txt").read_text().splitlines()
    second_log = (tmp_path / "second" / "log.txt").read_text().splitlines()
    assert second_log[:len(first_log)] == first_log and len(second_log) == len(first_log) + 3


def test_resuming_from_an_export_of_another_recipe_fails_before_any_run(tmp_path, tiny,
                                                                        monkeypatch):
    experiments.reproduce("tiny", tmp_path / "first", quick=True, seeds=1, workers=1)
    experiments.export(tmp_path / "first", tmp_path / "exported", commit="abc", machine="here")
    other = sweep_helper.tiny_recipe("other")
    monkeypatch.setitem(experiments.RECIPES, other.name, other)
    with pytest.raises(ValueError, match="exported holds results of .*'recipe': 'tiny'"):
        experiments.reproduce("other", tmp_path / "second", quick=True, seeds=1, workers=1,
                              resume_from=tmp_path / "exported")
    with experiments.Store.in_folder(tmp_path / "second") as store:
        assert store.runs() == []
    with pytest.raises(ValueError, match="not an exported results folder: expected runs.csv"):
        experiments.reproduce("tiny", tmp_path / "third", quick=True, seeds=1, workers=1,
                              resume_from=tmp_path / "first")


def test_a_sweep_of_another_mode_copies_only_the_runs_it_shares(tmp_path, tiny):
    """The decisive mode resumes from a full export: a run's key hashes its whole
    configuration, so only identical runs are copied, and the log is not mixed."""
    experiments.reproduce("tiny", tmp_path / "first", quick=True, seeds=1, workers=1)
    experiments.export(tmp_path / "first", tmp_path / "exported", commit="abc", machine="here")
    said = []
    experiments.reproduce("tiny", tmp_path / "second", quick=False, seeds=2, workers=1,
                          resume_from=tmp_path / "exported", say=said.append)
    assert said[0].endswith(": 3 finished runs copied, 0 left (already here, failed, or not "
                            "in this recipe)")
    with experiments.Store.in_folder(tmp_path / "second") as store:
        assert sorted(r.config["seed"] for r in store.runs()) == [0, 0, 0, 1, 1, 1]
    log = (tmp_path / "second" / "log.txt").read_text()
    assert "--quick" not in log


def test_a_method_not_registered_fails_before_any_run(tmp_path, monkeypatch):
    recipe = sweep_helper.tiny_recipe("needs-new", norms=("none", "not_yet_registered"))
    monkeypatch.setitem(experiments.RECIPES, recipe.name, recipe)
    with pytest.raises(ValueError, match="unknown normalization 'not_yet_registered'"):
        experiments.reproduce("needs-new", tmp_path, quick=True)
    assert not (tmp_path / "results.db").exists()


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match="expected one of .*fastnorm.*lecture"):
        experiments.get_recipe("fastnrom")


def test_reproduce_falls_back_to_digits_when_mnist_cannot_be_had(tmp_path, monkeypatch,
                                                                 needs_sklearn):
    def jobs(settings):  # the tiny recipe's runs, on the task of the dataset it was given
        return [dataclasses.replace(job, task=f"{settings.dataset}-mlp")
                if isinstance(job, training.TrainConfig) else job
                for job in sweep_helper.tiny_jobs(settings)]
    recipe = dataclasses.replace(sweep_helper.tiny_recipe("tiny-mnist"), dataset="mnist",
                                 jobs=jobs, protocol=lambda s: [f"data: {s.dataset}"])
    monkeypatch.setitem(experiments.RECIPES, recipe.name, recipe)
    monkeypatch.setattr(data, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens
    said = []
    path = experiments.reproduce("tiny-mnist", tmp_path / "out", quick=True, seeds=1,
                                 workers=1, data_dir=tmp_path / "no-data", say=said.append)
    assert len(said) == 1 and "MNIST unavailable" in said[0]
    assert "falling back to the digits dataset" in said[0]
    with experiments.Store.in_folder(tmp_path / "out") as store:
        assert store.meta()["settings"]["dataset"] == "digits"
        tasks = {r.config.get("task") for r in store.runs() if r.config["kind"] == "train"}
        assert tasks == {"digits-mlp"} and all(r.status == "done" for r in store.runs())
    assert "data: digits" in path.read_text()


def test_an_export_carries_the_checkpoints_of_unfinished_runs_and_a_resumed_sweep_continues_them(
        tmp_path, monkeypatch, needs_sklearn):
    """An EquiNorm run outlasts a working session: its checkpoint travels with the committed
    export, and the next machine continues it mid-run."""
    job = sweep_helper.training_job()
    recipe = dataclasses.replace(sweep_helper.tiny_recipe("mid-run"), jobs=lambda s: [job])
    monkeypatch.setitem(experiments.RECIPES, recipe.name, recipe)
    first = tmp_path / "first"
    with experiments.Store.in_folder(first) as store:
        store.set_meta(settings=experiments.Settings("mid-run", True, 1, "digits").to_dict())
        sweep_helper.plant_checkpoint(store, job)
    (first / "checkpoints" / f"{job.key()}.pt.partial").write_bytes(b"half-written")
    exported = tmp_path / "exported"
    (exported / "checkpoints").mkdir(parents=True)
    (exported / "checkpoints" / "finished-since.pt").write_bytes(b"stale")
    experiments.export(first, exported, commit="abc", machine="here")
    assert [p.name for p in (exported / "checkpoints").iterdir()] == [f"{job.key()}.pt"]
    said = []
    experiments.reproduce("mid-run", tmp_path / "second", quick=True, seeds=1, workers=1,
                          resume_from=exported, say=said.append)
    assert said[0].endswith("; 1 unfinished runs continue from its checkpoints")
    with experiments.Store.in_folder(tmp_path / "second") as store:
        (run,) = store.runs()
    assert run.status == "done"
    assert run.history[0]["test_acc"] == sweep_helper.RESUMED_MARK  # continued, not restarted
    assert not list((tmp_path / "second" / "checkpoints").glob("*.pt"))
