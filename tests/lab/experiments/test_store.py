import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sweep_helper

from normlab import cli, experiments
from normlab.experiments import run_sweep
from normlab.experiments.store import (
    DB_NAME,
    HOLDER_NAME,
    LOCK_NAME,
    FolderInUse,
    FolderLock,
    OutputError,
    Run,
    Store,
)

HELPER = Path(sweep_helper.__file__)
SRC = Path(__file__).resolve().parents[3] / "src"


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


def _corrupt_a_page(path: Path) -> None:
    """Overwrite the middle of a database with bytes that are no b-tree page."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(size // 2)
        file.write(b"\xff" * 4096)


@pytest.mark.parametrize("damage", ["not a database", "a damaged page"])
def test_a_corrupted_database_is_reported_with_its_path_and_left_untouched(tmp_path, damage):
    path = tmp_path / DB_NAME
    if damage == "not a database":
        path.write_bytes(b"these are not the results you are looking for" * 100)
    else:
        with Store(path) as store:
            for i in range(200):
                store.record(_run(f"run{i}", points=20))
        _corrupt_a_page(path)
    before = path.read_bytes()
    with pytest.raises(OutputError, match=f"{re.escape(str(path))} is not a readable results "
                                          f"database .*left untouched"):
        Store(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == [DB_NAME]


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder lock, says so on stdout and sleeps."""
    code = ("import sys, time; from normlab.experiments.store import FolderLock\n"
            f"with FolderLock({str(folder)!r}, command='normlab reproduce x'):\n"
            "    print('locked', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(SRC)})
    assert process.stdout.readline() == "locked\n"
    return process


def test_the_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(FolderInUse) as refused:
            FolderLock(tmp_path).__enter__()
        message = str(refused.value)
        assert f"process {holder.pid} on host {socket.gethostname()}, started 20" in message
        assert "(normlab reproduce x)" in message and "run this command again" in message
    finally:
        holder.kill()  # a crash: the lock file stays, naming a dead process
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists() and (tmp_path / HOLDER_NAME).read_text()
    with FolderLock(tmp_path):  # not blocked
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / HOLDER_NAME).read_text() == ""  # released: names nobody


def _reproduce(out: Path, gate: Path, pid_dir: Path) -> subprocess.Popen:
    """`normlab reproduce` in a fresh interpreter, on two probes that wait while `gate` exists."""
    pid_dir.mkdir(exist_ok=True)
    call = (f"sweep_helper.reproduce_main({str(out)!r}, 0, 2, {str(gate)!r}, {str(pid_dir)!r}, "
            f"'--workers', '2')")  # both at once, whatever CPUs the tests may use
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HELPER.parent)])}
    return subprocess.Popen([sys.executable, "-c", f"import sweep_helper; {call}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_files(folder: Path, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := [int(p.name) for p in folder.iterdir()]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} workers started"
        time.sleep(0.05)
    return pids


def test_a_second_reproduce_on_a_busy_folder_refuses_and_a_crashed_one_blocks_nothing(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    gate.touch()
    first = _reproduce(out, gate, tmp_path / "first")
    started = [first]
    try:
        first_workers = _wait_for_files(tmp_path / "first", 2)  # both jobs running
        started.append(second := _reproduce(out, gate, tmp_path / "second"))
        assert second.wait(timeout=60) == 1
        err = second.stderr.read()
        assert (f"is in use by another run: process {first.pid} on host "
                f"{socket.gethostname()}") in err
        assert "run this command again" in err and "Traceback" not in err
        assert not any((tmp_path / "second").iterdir())  # it ran nothing
        for pid in [first.pid, *first_workers]:  # the first one crashes
            os.kill(pid, signal.SIGKILL)
        first.wait()
        gate.unlink()
        started.append(third := _reproduce(out, gate, tmp_path / "third"))
        assert third.wait(timeout=60) == 0, third.stderr.read()
    finally:
        gate.unlink(missing_ok=True)  # lets any worker left behind finish
        for process in started:
            process.kill()
            process.wait()
    with Store.in_folder(out) as store:
        runs = store.runs()
    assert sorted(r.config["seed"] for r in runs) == [0, 1]
    assert all(r.status == "done" and r.history == sweep_helper.points(r.config["seed"])
               for r in runs)


def test_an_unwritable_folder_fails_before_any_run(tmp_path, monkeypatch, capsys):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    recipe = sweep_helper.probe_recipe(sweep_helper.jobs(2, 0.0, str(pid_dir)))
    monkeypatch.setitem(experiments.RECIPES, "probes", recipe)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"  # a folder under a file: no one can create it
    assert cli.main(["reproduce", "probes", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot write to {out} (Not a directory); name a folder that can be " \
        f"created and written" in err
    assert not any(pid_dir.iterdir())


def _where_permissions_bind() -> list[str]:
    """A command prefix under which permission bits bind: none for a user; for root,
    setpriv without the capabilities that let root write anywhere."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"]).returncode:
        pytest.skip("running as root, and setpriv cannot drop root's power to write anywhere")
    return prefix


@pytest.mark.parametrize("read_only", ["the folder", "the database"])
def test_a_read_only_output_fails_before_any_run_and_changes_nothing(tmp_path, read_only):
    prefix = _where_permissions_bind()
    out, gate, pid_dir = tmp_path / "out", tmp_path / "gate", tmp_path / "pids"
    pid_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HELPER.parent)])}

    def reproduce(count: int) -> subprocess.CompletedProcess:
        call = f"sweep_helper.reproduce_main({str(out)!r}, {count}, 0, {str(gate)!r}, " \
               f"{str(pid_dir)!r})"
        return subprocess.run([*prefix, sys.executable, "-c", f"import sweep_helper; {call}"],
                              env=env, capture_output=True, text=True, timeout=120)

    if read_only == "the folder":  # the command's check of --out refuses it (bad input)
        out.mkdir(mode=0o555)
        status, expected = 2, f"--out: cannot write to {out} (Permission denied)"
    else:  # the folder is writable, the database not: the store refuses it
        status = 1
        assert reproduce(1).returncode == 0  # a finished sweep of one probe, then one more
        (out / DB_NAME).chmod(0o444)
        expected = f"cannot write to {out / DB_NAME}: attempt to write a readonly database"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    child = reproduce(2)
    assert child.returncode == status and expected in child.stderr, child.stderr
    assert "Traceback" not in child.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_stops_the_sweep_at_the_first_failed_write_with_every_run_whole(tmp_path):
    count = 60
    with Store.in_folder(tmp_path):
        pass  # the empty database the limit starts from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HELPER.parent)])}
    call = f"sweep_helper.full_disk_main({str(tmp_path)!r}, {count}, 16384)"
    child = subprocess.run([sys.executable, "-c", f"import sweep_helper; {call}"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 1, child.stderr
    assert f"to {tmp_path / DB_NAME}: " in child.stderr and "it was not stored" in child.stderr
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert 0 < runs < count  # stopped part-way, each stored run whole:
    assert db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == runs * 2 * 5
    db.close()
    with Store.in_folder(tmp_path) as store:  # room again: the rerun finishes the rest
        counts = run_sweep(sweep_helper.jobs(count, 0.0), store, workers=1,
                           stream=open(os.devnull, "w"))
    assert counts["skipped"] == runs and counts["done"] == count - runs
