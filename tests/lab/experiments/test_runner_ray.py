"""The Ray executor keeps the local runner's promises; one local Ray instance serves the module."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sweep_helper

from conftest import require_module
from normlab.experiments import LocalPool, OutputError, Probe, RayCluster, Store, run_sweep

# Ray reads this at import: the test cluster listens on the loopback interface only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
require_module("ray")
import ray  # noqa: E402

HELPER = Path(sweep_helper.__file__)
SRC = Path(__file__).resolve().parents[3] / "src"
PATH = os.pathsep.join([str(SRC), str(HELPER.parent)])


@pytest.fixture(scope="module")
def cluster():
    """The address of a 2-CPU local Ray instance whose workers import the test helpers."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = PATH  # Ray's workers inherit the driver's environment
    try:
        context = ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield context.address_info["address"]
    finally:
        ray.shutdown()
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def _sweep(folder: Path, jobs, executor) -> dict:
    with Store.in_folder(folder) as store:
        return run_sweep(jobs, store, executor=executor, log_path=folder / "log.txt",
                         stream=open(os.devnull, "w"))


def _stored(folder: Path) -> list[tuple]:
    """Every run as stored, less what differs between two runs of it (times, traceback paths)."""
    db = sqlite3.connect(folder / "results.db")
    runs = [(key, config, status, error and error.strip().splitlines()[-1])
            for key, config, status, error in db.execute(
                "SELECT key, config, status, error FROM runs ORDER BY key")]
    metrics = db.execute("SELECT * FROM metrics ORDER BY key, point, name").fetchall()
    db.close()
    return runs + metrics


def test_a_ray_sweep_stores_what_the_local_pool_stores_and_a_rerun_skips_it(tmp_path, cluster):
    jobs = sweep_helper.jobs(4, 0.0) + [Probe(sweep_helper.failing_probe, 7)]
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    expected = {"done": 4, "diverged": 0, "failed": 1, "skipped": 0}
    assert _sweep(tmp_path / "local", jobs, LocalPool(2)) == expected
    assert _sweep(tmp_path / "ray", jobs, RayCluster()) == expected
    assert _stored(tmp_path / "ray") == _stored(tmp_path / "local")
    assert len((tmp_path / "ray" / "log.txt").read_text().splitlines()) == 5
    rerun = _sweep(tmp_path / "ray", jobs, RayCluster())  # only the failed run again
    assert rerun == {"done": 0, "diverged": 0, "failed": 1, "skipped": 4}
    assert ray.is_initialized()  # a sweep leaves a Ray it did not start running


def test_a_task_whose_worker_dies_is_recorded_failed_then_retried(tmp_path, cluster):
    marker = tmp_path / "killed-once"
    jobs = sweep_helper.jobs(2, 0.0) + [Probe(sweep_helper.dying_probe, 9, {"marker": str(marker)})]
    assert _sweep(tmp_path, jobs, RayCluster()) == {
        "done": 2, "diverged": 0, "failed": 1, "skipped": 0}
    with Store.in_folder(tmp_path) as store:
        (died,) = [r for r in store.runs() if r.status == "failed"]
    assert died.config["seed"] == 9 and died.error.startswith("WorkerCrashedError")
    assert _sweep(tmp_path, jobs, RayCluster()) == {
        "done": 1, "diverged": 0, "failed": 0, "skipped": 2}
    with Store.in_folder(tmp_path) as store:
        assert {r.config["seed"]: r.history for r in store.runs()} == {
            seed: sweep_helper.points(seed) for seed in (0, 1, 9)}


@pytest.mark.usefixtures("needs_sklearn")
def test_a_ray_task_resumes_a_training_run_from_its_checkpoint_in_the_sweep_folder(
        tmp_path, cluster, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out: the workers get the absolute path
    job = sweep_helper.training_job()
    with Store.in_folder("sweep") as store:
        path = sweep_helper.plant_checkpoint(store, job)
        assert run_sweep([job], store, executor=RayCluster(),
                         stream=open(os.devnull, "w"))["done"] == 1
        (run,) = store.runs()
    assert [point["step"] for point in run.history] == [5, 10, 15, 16]
    assert run.history[0]["test_acc"] == sweep_helper.RESUMED_MARK  # continued, not redone
    assert not path.exists()


def test_a_sweep_that_stops_cancels_its_busy_tasks(tmp_path, cluster, monkeypatch):
    gate, pid_dir = tmp_path / "gate", tmp_path / "pids"
    pid_dir.mkdir()
    gate.touch()

    def disk_full(run):  # once both gated probes run
        _wait_until(lambda: len(list(pid_dir.iterdir())) == 2, "the gated probes start")
        raise OutputError("disk full")

    with Store.in_folder(tmp_path) as store:
        monkeypatch.setattr(store, "record", disk_full)
        with pytest.raises(OutputError, match="disk full"):
            run_sweep(sweep_helper.gated_jobs(1, 2, str(gate), str(pid_dir)), store,
                      executor=RayCluster(), stream=open(os.devnull, "w"))
    busy = [int(p.name) for p in pid_dir.iterdir()]
    # this driver lives on, and so would the tasks, were they not cancelled
    _wait_until(lambda: not any(map(_alive, busy)), f"the workers {busy} stop")


def _wait_until(condition, what: str, timeout: float = 180) -> None:
    # Ray starts a worker process per task: on 2 busy cores that took over a minute
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _reproduce_on_ray(out: Path, gate: Path, pid_dir: Path, address: str) -> subprocess.Popen:
    """`normlab reproduce --executor ray --address ADDRESS` in a fresh interpreter, on three
    quick probes and two that wait while `gate` exists."""
    call = (f"sweep_helper.reproduce_main({str(out)!r}, 3, 2, {str(gate)!r}, {str(pid_dir)!r}, "
            f"'--executor', 'ray', '--address', {address!r})")
    return subprocess.Popen([sys.executable, "-c", f"import sweep_helper; {call}"],
                            env={**os.environ, "PYTHONPATH": PATH},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _count(folder: Path) -> int:
    if not (folder / "results.db").exists():
        return 0
    db = sqlite3.connect(folder / "results.db")
    try:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0
    finally:
        db.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_cancels_the_outstanding_tasks_and_the_rerun_completes_the_sweep(tmp_path,
                                                                                 cluster):
    out, gate, pid_dir = tmp_path / "out", tmp_path / "gate", tmp_path / "pids"
    pid_dir.mkdir()
    gate.touch()
    driver = _reproduce_on_ray(out, gate, pid_dir, cluster)
    try:
        deadline = time.monotonic() + 120
        # the quick probes stored, the gated ones busy
        while len(busy := [int(p.name) for p in pid_dir.iterdir()]) < 2 or _count(out) < 3:
            sweep_helper.assert_alive_before(driver, deadline)
            time.sleep(0.1)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) == 130, driver.stderr.read()
    finally:
        driver.kill()
    _wait_until(lambda: not any(map(_alive, busy)), f"the workers {busy} stop")
    with Store.in_folder(out) as store:
        assert sorted(r.config["seed"] for r in store.runs()) == [0, 1, 2]
    gate.unlink()
    rerun = _reproduce_on_ray(out, gate, pid_dir, cluster)
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read()
    with Store.in_folder(out) as store:
        assert {r.config["seed"]: (r.status, r.history) for r in store.runs()} == {
            seed: ("done", sweep_helper.points(seed)) for seed in range(5)}
