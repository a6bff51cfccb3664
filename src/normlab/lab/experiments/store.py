"""The results database: one SQLite file per output folder.

A run is keyed by the hash of its configuration. Its row in ``runs`` and its
rows in ``metrics`` (one per evaluation point and metric) are written in one
transaction once the run has ended, so an interrupted sweep never leaves a
half-written run behind: a run is either fully in the database or absent.
``meta`` holds what the report needs to re-render (recipe, mode, protocol).

One sweep at a time owns a folder (`FolderLock`, portable through `filelock`).
A database that cannot be read or written raises `OutputError` naming its
path; a corrupted one is never replaced.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import filelock

DB_NAME = "results.db"
LOCK_NAME = "normlab.lock"
HOLDER_NAME = "normlab.holder.json"  # who holds the lock: read by the run it refuses
FINISHED = ("done", "diverged")  # a rerun skips these; a failed run is retried

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'diverged', 'failed')),
    error TEXT,
    wall_time REAL NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE,
    point INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (key, point, name)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Run:
    """One finished run as stored: its configuration, status and history."""

    key: str
    config: dict
    status: str
    wall_time: float
    history: list[dict] = field(default_factory=list)
    error: str | None = None


class OutputError(Exception):
    """The output folder or its database cannot be used (unwritable, full, corrupted, busy)."""


class FolderInUse(OutputError):
    """Another sweep holds the folder's lock."""


class FolderLock:
    """Exclusive use of an output folder by one sweep: an OS file lock on ``LOCK_NAME``
    (flock on Linux and macOS, LockFileEx on Windows, through `filelock`).

    The operating system drops the lock when its holder ends, however it ends
    (a crash, SIGKILL, a lost node's process on a shared disk), so a dead run
    never blocks the folder. The holder's pid, host, start time and command go
    to ``HOLDER_NAME``, a file of its own (Windows forbids reading a locked
    file), for the message the next run shows. Creating the folder is the
    sweep's first write, so a folder that cannot be written fails here, before
    any work.
    """

    def __init__(self, folder: str | Path, command: str = ""):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self.holder_path = self.folder / HOLDER_NAME
        self._lock: filelock.BaseFileLock | None = None

    def __enter__(self) -> FolderLock:
        lock = filelock.FileLock(self.path, timeout=0)  # never wait: say who holds it
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except filelock.Timeout:
            raise FolderInUse(
                f"{self.folder} is in use by another run: {self._holder()}. Wait for it to "
                f"finish, or stop it and run this command again (finished runs are kept and "
                f"skipped), or choose another --out") from None
        except OSError as err:
            raise OutputError(f"cannot write to the output folder {self.folder}: {err}; "
                              f"choose a writable --out") from err
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self.command}
        try:
            self.holder_path.write_text(json.dumps(holder))
        except OSError as err:
            lock.release()
            raise OutputError(f"cannot write {self.holder_path}: {err}") from err
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        try:  # the holder is gone: a stale name would only mislead
            self.holder_path.write_text("")
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def _holder(self) -> str:
        try:
            return _describe_holder(self.holder_path.read_text())
        except OSError:  # it holds the lock but has not written yet
            return _describe_holder("")


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return (f"process {h['pid']} on host {h['host']}, started {h['started']}"
                + (f" ({h['command']})" if h.get("command") else ""))
    except (ValueError, KeyError, TypeError):  # it holds the lock but has not written yet
        return "a process that has just started"


class Store:
    """The SQLite results database of one output folder.

    Raises `OutputError` naming the file when it is not a database, or is
    damaged (SQLite's quick_check), or cannot be written; the file is left as it is.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the folder of {self.path}: {err}") from err
        self._db = sqlite3.connect(self.path, timeout=30)
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.executescript(_SCHEMA)
            problems = [row for (row,) in self._db.execute("PRAGMA quick_check")]
        except sqlite3.OperationalError as err:
            self._db.close()
            raise OutputError(f"cannot open the results database {self.path}: {err}") from err
        except sqlite3.DatabaseError as err:  # not a database at all
            self._db.close()
            raise OutputError(_corrupted(self.path, str(err))) from err
        if problems != ["ok"]:
            self._db.close()
            lines = [line for text in problems for line in text.splitlines()
                     if not line.startswith("***")]  # "*** in database main ***"
            more = f" and {len(lines) - 2} more problems" if len(lines) > 2 else ""
            raise OutputError(_corrupted(self.path, "; ".join(lines[:2]) + more))

    @classmethod
    def in_folder(cls, folder: str | Path) -> Store:
        return cls(Path(folder) / DB_NAME)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finished_keys(self) -> set[str]:
        marks = ",".join("?" * len(FINISHED))
        rows = self._db.execute(f"SELECT key FROM runs WHERE status IN ({marks})", FINISHED)
        return {key for (key,) in rows}

    def record(self, run: Run) -> None:
        """Write `run` and its metrics in one transaction (replacing a failed attempt).

        A write the disk refuses (full, read-only, I/O error) raises `OutputError`
        and leaves the database as it was.
        """
        try:
            with self._db:  # commits on success, rolls back on any error
                self._db.execute("DELETE FROM runs WHERE key = ?", (run.key,))
                self._db.execute(
                    "INSERT INTO runs (key, config, status, error, wall_time, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (run.key, json.dumps(run.config, sort_keys=True), run.status, run.error,
                     run.wall_time, time.time()))
                self._db.executemany(
                    "INSERT INTO metrics (key, point, name, value) VALUES (?, ?, ?, ?)",
                    [(run.key, i, name, float(value)) for i, point in enumerate(run.history)
                     for name, value in point.items()])
        except sqlite3.OperationalError as err:
            raise OutputError(f"cannot write run {run.key} to {self.path}: {err}; it was not "
                              f"stored, and the runs stored before it are intact") from err

    def runs(self) -> list[Run]:
        """Every stored run with its history, in the order they finished."""
        history: dict[str, dict[int, dict]] = {}
        for key, point, name, value in self._db.execute(
                "SELECT key, point, name, value FROM metrics ORDER BY key, point"):
            history.setdefault(key, {}).setdefault(point, {})[name] = value
        return [Run(key, json.loads(config), status, wall_time,
                    [points[i] for i in sorted(points)] if (points := history.get(key)) else [],
                    error)
                for key, config, status, error, wall_time in self._db.execute(
                    "SELECT key, config, status, error, wall_time FROM runs "
                    "ORDER BY finished_at, key")]

    def set_meta(self, **values) -> None:
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                                     [(k, json.dumps(v)) for k, v in values.items()])
        except sqlite3.OperationalError as err:
            raise OutputError(f"cannot write to {self.path}: {err}") from err

    def meta(self) -> dict:
        return {name: json.loads(value)
                for name, value in self._db.execute("SELECT name, value FROM meta")}


def _corrupted(path: Path, detail: str) -> str:
    return (f"{path} is not a readable results database ({detail}). It was left untouched: "
            f"restore it from a copy, or move it away to start the sweep afresh")
