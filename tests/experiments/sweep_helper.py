"""Jobs for the runner tests, importable by the pool's workers and by a child sweep."""

import os
import sys
import time
from pathlib import Path

from normlab.experiments import Probe, Store, run_sweep
from normlab.experiments.runner import Interrupted

POINTS = 5


def slow_probe(seed: int, seconds: float, pid_dir: str | None = None) -> list[dict]:
    """Sleeps, then returns POINTS evaluation points; announces its worker's pid."""
    if pid_dir:
        (Path(pid_dir) / str(os.getpid())).touch()
    time.sleep(seconds)
    return [{"point": i, "value": seed * 100 + i} for i in range(POINTS)]


def failing_probe(seed: int) -> list[dict]:
    raise RuntimeError(f"probe failed on purpose (seed {seed})")


def jobs(count: int, seconds: float, pid_dir: str | None = None) -> list[Probe]:
    return [Probe(slow_probe, seed, {"seconds": seconds, "pid_dir": pid_dir})
            for seed in range(count)]


if __name__ == "__main__":  # python sweep_helper.py FOLDER COUNT SECONDS [PID_DIR]
    folder, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    pid_dir = sys.argv[4] if len(sys.argv) > 4 else None
    with Store.in_folder(folder) as store:
        try:
            run_sweep(jobs(count, seconds, pid_dir), store, workers=2)
        except Interrupted:
            sys.exit(130)
