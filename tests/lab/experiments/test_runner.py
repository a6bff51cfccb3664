import io
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sweep_helper

from normlab import training
from normlab.experiments import Executor, Probe, RayCluster, Store, run_sweep
from normlab.experiments.runner import checkpoint_for, execute, job_config
from normlab.experiments.store import Run

HELPER = Path(sweep_helper.__file__)
SRC = Path(__file__).resolve().parents[3] / "src"


def _db_rows(folder: Path) -> tuple[list, list]:
    db = sqlite3.connect(folder / "results.db")
    runs = db.execute("SELECT key, config, status, error, wall_time, finished_at FROM runs "
                      "ORDER BY key").fetchall()
    metrics = db.execute("SELECT * FROM metrics ORDER BY key, point, name").fetchall()
    db.close()
    return runs, metrics


def test_sweep_records_every_run_and_a_rerun_changes_nothing(tmp_path):
    jobs = sweep_helper.jobs(4, 0.0) + [Probe(sweep_helper.failing_probe, 7)]
    log = tmp_path / "log.txt"
    with Store.in_folder(tmp_path) as store:
        counts = run_sweep(jobs, store, workers=2, log_path=log, stream=open(os.devnull, "w"))
        assert counts == {"done": 4, "diverged": 0, "failed": 1, "skipped": 0}
        runs = {r.config["seed"]: r for r in store.runs()}
    assert runs[7].status == "failed" and "probe failed on purpose" in runs[7].error
    assert [p["value"] for p in runs[2].history] == [200, 201, 202, 203, 204]
    assert len(log.read_text().splitlines()) == 5
    before = _db_rows(tmp_path)
    with Store.in_folder(tmp_path) as store:
        counts = run_sweep(jobs[:4], store, workers=2, stream=open(os.devnull, "w"))
    assert counts["skipped"] == 4 and counts["done"] == 0
    assert _db_rows(tmp_path) == before


def test_a_failed_run_is_retried_by_the_next_sweep_and_replaced(tmp_path):
    flaky = Probe(sweep_helper.flaky_probe, 5, {"marker": str(tmp_path / "failed-once")})
    jobs = sweep_helper.jobs(2, 0.0) + [flaky]
    with Store.in_folder(tmp_path) as store:
        first = run_sweep(jobs, store, workers=1, stream=open(os.devnull, "w"))
        assert first == {"done": 2, "diverged": 0, "failed": 1, "skipped": 0}
        second = run_sweep(jobs, store, workers=1, stream=open(os.devnull, "w"))
        assert second == {"done": 1, "diverged": 0, "failed": 0, "skipped": 2}
        runs = store.runs()
    assert sorted(r.config["seed"] for r in runs) == [0, 1, 5]  # the failure is replaced
    (retried,) = [r for r in runs if r.key == flaky.key()]
    assert retried.status == "done" and retried.error is None
    assert [p["value"] for p in retried.history] == [500, 501, 502, 503, 504]


def test_a_worker_gets_threads_for_the_cpus_the_sweep_may_use_not_the_machines(tmp_path):
    # Pinned to one CPU (taskset -c 1), one worker with two threads would stall at barriers.
    code = ("import os, sys, sweep_helper\n"
            "from normlab.experiments import Probe, Store, run_sweep\n"
            "if __name__ == '__main__':\n"
            "    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "    with Store.in_folder(sys.argv[1]) as store:\n"
            "        run_sweep([Probe(sweep_helper.threads_probe, 0)], store, workers=1,\n"
            "                  stream=open(os.devnull, 'w'))\n"
            "        print(store.runs()[0].history[0]['value'])\n")
    result = _run_script(code, tmp_path)
    assert float(result.stdout) == 1


def test_progress_line_counts_runs_and_gives_an_eta(tmp_path, capsys):
    with Store.in_folder(tmp_path) as store:
        run_sweep(sweep_helper.jobs(3, 0.0), store, workers=1, label="demo", stream=sys.stderr)
    err = capsys.readouterr().err
    assert "demo: 3/3 runs" in err and "ETA 0m00s" in err and "demo: 0/3 runs" in err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [io.StringIO(), _Terminal()], ids=["log", "terminal"])
def test_progress_is_a_line_per_run_off_a_terminal_and_one_line_on_it(tmp_path, stream):
    jobs = sweep_helper.jobs(3, 0.0) + [Probe(sweep_helper.failing_probe, 7)]
    with Store.in_folder(tmp_path) as store:
        run_sweep(jobs, store, workers=1, label="demo", stream=stream)
    text = stream.getvalue()
    if stream.isatty():  # rewritten in place, ended once
        assert text.count("\r") == 5 and text.count("\n") == 1 and text.endswith("\n")
    else:  # a log: one line per state, nothing rewritten
        lines = text.splitlines()
        assert "\r" not in text and len(lines) == 5 and text.endswith("\n")
        assert lines[0].startswith("demo: 0/4 runs, elapsed")
        assert lines[-1].startswith("demo: 4/4 runs, 1 failed, elapsed")


def test_the_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ValueError, match=r"needs Ray: pip install 'normlab\[ray\]'"):
        RayCluster().start(1)


@pytest.mark.usefixtures("needs_sklearn")
def test_nan_loss_is_recorded_as_diverged():
    config = training.TrainConfig(task="digits-mlp", norm="none", lr=1e12, batch_size=32,
                                  eval_every=1, model_kw={"hidden": 16})
    run = execute(config)
    assert run.status == "diverged" and run.key == config.key()
    assert run.config == job_config(config) and run.config["kind"] == "train"
    # recorded up to the first non-finite test loss, and no further
    assert len(run.history) >= 2 and not math.isfinite(run.history[-1]["test_loss"])
    assert all(math.isfinite(p["test_loss"]) for p in run.history[:-1])


def _run_script(code: str, folder: Path) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter with `folder` as its argument; it must succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HELPER.parent)])}
    result = subprocess.run([sys.executable, "-c", code, str(folder)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def _start_sweep(folder: Path, count: int, seconds: float, pid_dir: Path,
                 gate: Path | None = None):
    gate_arg = repr(str(gate)) if gate else None
    call = f"sweep_helper.main({str(folder)!r}, {count}, {seconds}, {str(pid_dir)!r}, {gate_arg})"
    args = [sys.executable, "-c", f"import sweep_helper; {call}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HELPER.parent)])}
    return subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)


def _wait_for_runs(folder: Path, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / "results.db").exists():
            with Store.in_folder(folder) as store:
                if len(store.finished_keys()) >= at_least:
                    return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} runs finished within {timeout} s")


def _check_complete(folder: Path, count: int) -> None:
    with Store.in_folder(folder) as store:
        runs = store.runs()
    assert sorted(r.config["seed"] for r in runs) == list(range(count))  # none lost or twice
    for run in runs:
        assert run.status == "done"
        assert [p["value"] for p in run.history] == [
            run.config["seed"] * 100 + i for i in range(sweep_helper.POINTS)]


# Each case starts two sweeps of fresh interpreters (~10 s). The runs after the
# first two wait on a gate, so the interruption always comes mid-sweep, however
# slow the machine.
@pytest.mark.parametrize("interruption, exit_status",
                         [("sigterm", 143), ("ctrl-c", 130), ("killed worker", 1)])
def test_an_interrupted_sweep_resumes_without_loss_or_duplicates(tmp_path, interruption,
                                                                 exit_status):
    count, pid_dir, gate = 8, tmp_path / "pids", tmp_path / "gate"
    pid_dir.mkdir()
    gate.touch()
    sweep = _start_sweep(tmp_path, count, 0.0, pid_dir, gate)
    _wait_for_runs(tmp_path, 2)
    deadline = time.monotonic() + 60
    while not any(pid_dir.iterdir()):  # a gated run is busy
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if interruption == "killed worker":
        os.kill(int(next(pid_dir.iterdir()).name), signal.SIGKILL)
    else:
        sweep.send_signal(signal.SIGINT if interruption == "ctrl-c" else signal.SIGTERM)
    assert sweep.wait(timeout=30) == exit_status
    runs_before, metrics_before = _db_rows(tmp_path)
    assert 2 <= len(runs_before) < count
    # every stored run is whole: POINTS points of two metrics each
    assert len(metrics_before) == len(runs_before) * sweep_helper.POINTS * 2
    gate.unlink()
    assert _start_sweep(tmp_path, count, 0.0, pid_dir, gate).wait(timeout=60) == 0
    _check_complete(tmp_path, count)
    runs_after, _ = _db_rows(tmp_path)
    assert set(runs_before) <= set(runs_after)  # runs finished before are kept as they were


def test_an_interrupted_sweep_stops_its_busy_workers_at_once(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    sweep = _start_sweep(tmp_path, 2, 120.0, pid_dir)  # runs far longer than the test
    deadline = time.monotonic() + 60
    while not any(pid_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=20) == 143
    for pid in (int(p.name) for p in pid_dir.iterdir()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_finished_sweep_leaves_no_leaked_semaphore(tmp_path):
    # Workers terminated instead of shut down leave their semaphores (tqdm's
    # lock) to multiprocessing's resource tracker, which warns at exit.
    code = ("import sys, sweep_helper\n"
            "from normlab.experiments import Probe, Store, run_sweep\n"
            "if __name__ == '__main__':\n"
            "    jobs = [Probe(sweep_helper.progress_probe, seed) for seed in range(2)]\n"
            "    with Store.in_folder(sys.argv[1]) as store:\n"
            "        run_sweep(jobs, store, workers=2)\n")
    assert "leaked semaphore" not in _run_script(code, tmp_path).stderr


# -- checkpoints -------------------------------------------------------------------------

class _InProcess(Executor):
    """Runs each job here, as `status` says: ``"real"`` executes it; otherwise the run is
    faked with that status after its checkpoint file, if it has one, is touched.
    Notes the checkpoint each job was given and whether its file existed as the run ended."""

    def __init__(self, status: str = "real"):
        self.status, self.given, self.existed = status, {}, {}

    def start(self, job_count):
        pass

    def completed(self, jobs, data_dir, checkpoints):
        for job in jobs:
            checkpoint = self.given[job.key()] = checkpoints.get(job.key())
            if self.status == "real":
                run = execute(job, data_dir, checkpoint)
            else:
                if checkpoint is not None:  # as a run that saved one
                    Path(checkpoint.path).parent.mkdir(parents=True, exist_ok=True)
                    Path(checkpoint.path).touch()
                run = Run(job.key(), job_config(job), self.status, 0.1, [])
            self.existed[job.key()] = checkpoint is not None and Path(checkpoint.path).exists()
            yield job, run

    def stop(self):
        pass


@pytest.mark.usefixtures("needs_sklearn")
def test_a_training_run_checkpoints_into_the_sweep_folder_which_drops_it_once_stored(tmp_path):
    job, probe = sweep_helper.training_job(), Probe(sweep_helper.slow_probe, 0, {"seconds": 0})
    executor = _InProcess()
    with Store.in_folder(tmp_path) as store:
        run_sweep([job, probe], store, executor=executor, checkpoint_every=1e-9,
                  stream=open(os.devnull, "w"))
        runs = {run.key: run for run in store.runs()}
    checkpoint = executor.given[job.key()]
    assert Path(checkpoint.path) == tmp_path.resolve() / "checkpoints" / f"{job.key()}.pt"
    assert checkpoint.seconds == 1e-9 and executor.given[probe.key()] is None
    assert executor.existed[job.key()]  # saved during the run (after every step here)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # and gone once stored
    # checkpointing changes neither the run's key nor its numbers
    assert runs[job.key()].status == "done"
    assert _numbers(runs[job.key()].history) == _numbers(training.train(job).history)


@pytest.mark.usefixtures("needs_sklearn")
def test_a_probe_that_trains_checkpoints_as_a_training_run_does(tmp_path):
    # (as onlinenorm's batch_probe: its CIFAR-10 runs are the sweep's longest)
    trains = Probe(sweep_helper.training_probe, 0, trains=True)
    measures = Probe(sweep_helper.training_probe, 1)
    executor = _InProcess()
    with Store.in_folder(tmp_path) as store:
        run_sweep([trains, measures], store, executor=executor, checkpoint_every=1e-9,
                  stream=open(os.devnull, "w"))
        runs = {run.key: run for run in store.runs()}
    checkpoint = executor.given[trains.key()]
    assert Path(checkpoint.path) == tmp_path.resolve() / "checkpoints" / f"{trains.key()}.pt"
    assert executor.given[measures.key()] is None
    assert executor.existed[trains.key()] and list((tmp_path / "checkpoints").iterdir()) == []
    # the flag is not part of the key (committed results keep theirs), nor are the numbers
    assert trains.key() == Probe(sweep_helper.training_probe, 0).key()
    assert runs[trains.key()].history == runs[measures.key()].history


def _numbers(history: list[dict]) -> list[dict]:
    """A history as stored (every value a float), less the wall times."""
    return [{name: float(value) for name, value in point.items() if name != "wall_time"}
            for point in history]


def test_a_failed_runs_checkpoint_is_kept_for_the_retry_and_a_finished_runs_is_removed(
        tmp_path):
    job, quiet = sweep_helper.training_job(), open(os.devnull, "w")
    with Store.in_folder(tmp_path) as store:
        path = Path(checkpoint_for(store, job).path)
        run_sweep([job], store, executor=_InProcess("failed"), stream=quiet)
        assert path.exists()
        run_sweep([job], store, executor=_InProcess("done"), stream=quiet)
        assert not path.exists()
        # a sweep killed between storing a run and deleting its checkpoint: the next drops it
        path.touch()
        Path(f"{path}.partial").touch()
        assert run_sweep([job], store, executor=_InProcess("done"), stream=quiet)["skipped"] == 1
        assert list(path.parent.iterdir()) == []


def test_checkpoint_every_zero_gives_no_checkpoint_and_a_negative_one_is_refused(tmp_path):
    job, executor = sweep_helper.training_job(), _InProcess("done")
    with Store.in_folder(tmp_path) as store:
        with pytest.raises(ValueError, match=r"checkpoint_every must be a number of seconds "
                                             r">= 0 \(0: no checkpoints\), got -1"):
            run_sweep([job], store, executor=executor, checkpoint_every=-1)
        assert run_sweep([job], store, executor=executor, checkpoint_every=0,
                         stream=open(os.devnull, "w"))["done"] == 1
    assert executor.given == {job.key(): None}
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.usefixtures("needs_sklearn")
def test_a_killed_sweeps_training_run_resumes_from_its_checkpoint_in_a_worker(tmp_path):
    job = sweep_helper.training_job()
    with Store.in_folder(tmp_path) as store:
        path = sweep_helper.plant_checkpoint(store, job)
        counts = run_sweep([job], store, workers=1, stream=open(os.devnull, "w"))
        (run,) = store.runs()
    assert counts["done"] == 1 and run.key == job.key()
    assert [point["step"] for point in run.history] == [5, 10, 15, 16]
    assert run.history[0]["test_acc"] == sweep_helper.RESUMED_MARK  # continued, not redone
    assert not path.exists()


def test_a_probes_revision_gives_it_a_new_key_and_revision_0_keeps_the_old_one():
    def measure(seed):
        return [{"x": seed}]

    plain, revised = Probe(measure), Probe(measure, revision=1)
    assert "revision" not in plain.to_dict()  # the keys of results stored before revisions
    assert revised.to_dict() == {**plain.to_dict(), "revision": 1}
    assert revised.key() != plain.key()
