"""The results database: one SQLite file per output folder.

A run is keyed by the hash of its configuration. Its row in ``runs`` and its
rows in ``metrics`` (one per evaluation point and metric) are written in one
transaction once the run has ended, so an interrupted sweep never leaves a
half-written run behind: a run is either fully in the database or absent.
``meta`` holds what the report needs to re-render (recipe, mode, protocol).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "results.db"
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


class Store:
    """The SQLite results database of one output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)

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
        """Write `run` and its metrics in one transaction (replacing a failed attempt)."""
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
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in values.items()])

    def meta(self) -> dict:
        return {name: json.loads(value)
                for name, value in self._db.execute("SELECT name, value FROM meta")}
