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
from normlab.experiments import Probe, RayCluster, Store, run_sweep
from normlab.experiments.runner import execute, job_config

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
@pytest.mark.parametrize("interruption", ["sigterm", "ctrl-c", "killed worker"])
def test_an_interrupted_sweep_resumes_without_loss_or_duplicates(tmp_path, interruption):
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
    assert sweep.wait(timeout=30) == 130
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
    assert sweep.wait(timeout=20) == 130
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
