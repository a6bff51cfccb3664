import sqlite3

import pytest

from normlab.experiments.store import Run, Store


def _run(key="a", status="done", points=3):
    return Run(key, {"kind": "probe", "seed": 0}, status, 1.5,
               [{"step": i, "acc": i / 10} for i in range(points)])


def test_a_run_round_trips_with_its_history(tmp_path):
    with Store.in_folder(tmp_path) as store:
        store.record(_run())
        (run,) = store.runs()
    assert run == _run()


def test_failed_runs_are_retried_and_replaced(tmp_path):
    with Store.in_folder(tmp_path) as store:
        store.record(Run("a", {"kind": "probe"}, "failed", 0.1, [], "Traceback ..."))
        store.record(_run("b", "diverged"))
        assert store.finished_keys() == {"b"}
        store.record(_run("a"))
        assert store.finished_keys() == {"a", "b"}
        assert [r.key for r in store.runs() if r.key == "a"] == ["a"]


def test_a_run_that_cannot_be_written_leaves_nothing(tmp_path):
    bad = Run("a", {"kind": "probe"}, "done", 1.0, [{"acc": 0.5}, {"acc": "not a number"}])
    with Store.in_folder(tmp_path) as store:
        with pytest.raises(ValueError):
            store.record(bad)
        assert store.runs() == []
    metrics = sqlite3.connect(tmp_path / "results.db").execute("SELECT COUNT(*) FROM metrics")
    assert metrics.fetchone() == (0,)


def test_unknown_status_is_refused(tmp_path):
    with Store.in_folder(tmp_path) as store, pytest.raises(sqlite3.IntegrityError):
        store.record(_run(status="finished"))


def test_meta_round_trips(tmp_path):
    with Store.in_folder(tmp_path) as store:
        store.set_meta(settings={"recipe": "x", "quick": True})
    with Store.in_folder(tmp_path) as store:
        assert store.meta() == {"settings": {"recipe": "x", "quick": True}}
