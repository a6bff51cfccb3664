"""Run a sweep of jobs on a local process pool, recording each in the store.

A job is a `training.TrainConfig` (a training run) or a `Probe` (a
measurement that trains nothing, such as the lecture's forward-pass claims).
Workers only compute; the parent process writes each finished run to the
database in one transaction. Jobs already finished in the database are
skipped, so an interrupted sweep (Ctrl-C, SIGTERM, a killed worker) resumes
where it stopped when the same command runs again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch

from .. import training
from .store import Run, Store


@dataclass(frozen=True)
class Probe:
    """A measurement job: ``fn(seed=seed, **params)`` returns its points (dicts of numbers).

    `fn` must be a module-level function so that workers can find it. A probe
    that reads a dataset says so with `uses_data`; it then also gets the
    sweep's ``data_dir`` (which is not part of its key: results do not depend on it).
    """

    fn: Callable[..., list[dict]]
    seed: int = 0
    params: dict = field(default_factory=dict)
    uses_data: bool = False

    def to_dict(self) -> dict:
        return {"probe": f"{self.fn.__module__}.{self.fn.__qualname__}", "seed": self.seed,
                "params": self.params}

    def key(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


Job = training.TrainConfig | Probe


def job_config(job: Job) -> dict:
    """The stored configuration; ``kind`` says which of the two job types it is."""
    return {"kind": "probe" if isinstance(job, Probe) else "train", **job.to_dict()}


def execute(job: Job, data_dir=None) -> Run:
    """Run one job; an exception becomes status ``failed`` with its traceback."""
    start = time.perf_counter()
    try:
        if isinstance(job, Probe):
            data_kw = {"data_dir": data_dir} if job.uses_data else {}
            status, history = "done", job.fn(seed=job.seed, **job.params, **data_kw)
        else:
            result = training.train(job, data_dir=data_dir)
            status, history = result.status, result.history
        error = None
    except Exception:  # a failed run is recorded, not fatal to the sweep
        status, history, error = "failed", [], traceback.format_exc()
    return Run(job.key(), job_config(job), status, time.perf_counter() - start, history, error)


def _init_worker(threads: int) -> None:
    # Ctrl-C reaches the whole process group: the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """The sweep stopped early (Ctrl-C, SIGTERM or a dead worker); rerun to resume."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signum}")


def run_sweep(jobs: list[Job], store: Store, workers: int | None = None, data_dir=None,
              log_path=None, label: str = "sweep", stream=sys.stderr) -> dict:
    """Run the jobs not yet finished in `store`; returns counts by status.

    Each worker gets ``cpu_count // workers`` torch threads. One progress
    line (runs done / total, ETA) goes to `stream`; one line per finished run
    goes to `log_path`. Raises `Interrupted` when stopped early; every run
    finished before that is in the store.
    """
    unique = list({job.key(): job for job in jobs}.values())
    finished = store.finished_keys()
    pending = [job for job in unique if job.key() not in finished]
    workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": len(unique) - len(pending)}
    progress = _Progress(label, len(unique), counts["skipped"], stream)
    if not pending:
        progress.finish()
        return counts
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    # spawn, not fork: a child forked from a parent whose OpenMP pool has run
    # (any earlier torch work) can hang in its first parallel region.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))
    log = open(log_path, "a") if log_path else None
    interrupted = True
    try:
        jobs_of = {executor.submit(execute, job, data_dir): job for job in pending}
        running = set(jobs_of)
        while running:
            completed, running = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                # key and config as the parent sees them: a worker may name a
                # job's module differently (__main__ is __mp_main__ there)
                job = jobs_of[future]
                run = dataclasses.replace(future.result(), key=job.key(), config=job_config(job))
                store.record(run)
                counts[run.status] += 1
                progress.update(run.status)
                if log:
                    log.write(_log_line(run) + "\n")
                    log.flush()
        interrupted = False
    except (KeyboardInterrupt, BrokenProcessPool) as err:
        raise Interrupted(f"{type(err).__name__}: {err}") from err
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if interrupted:
            _stop(executor)
        else:  # idle workers exit on their own, releasing what they hold (their
            # semaphores: terminated, they leave them to the resource tracker's warning)
            executor.shutdown(wait=True)
        progress.finish()
        if log:
            log.close()
    return counts


def _stop(executor: ProcessPoolExecutor) -> None:
    # Unfinished runs are simply rerun later. No public way to stop busy
    # workers exists before Python 3.14 (terminate_workers), and shutdown
    # forgets them, so they are collected first.
    workers = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()
    executor.shutdown(wait=True)


def _log_line(run: Run) -> str:
    config = run.config
    what = (config.get("probe") if config["kind"] == "probe" else
            f"{config['task']} norm={config['norm']} lr={config['lr']} "
            f"batch={config['batch_size']} dtype={config['dtype']}")
    last = run.history[-1] if run.history else {}
    acc = f" test_acc={last['test_acc']:.4f}" if "test_acc" in last else ""
    error = f" error={run.error.strip().splitlines()[-1]}" if run.error else ""
    return (f"{run.key} {what} seed={config['seed']} {run.status}{acc} "
            f"{run.wall_time:.1f}s{error}")


class _Progress:
    """One line for the sweep: runs done / total, failures, elapsed time and ETA."""

    def __init__(self, label: str, total: int, already: int, stream):
        self.label, self.total, self.done, self.stream = label, total, already, stream
        self.already, self.start, self.bad = already, time.perf_counter(), 0
        self._show()

    def update(self, status: str) -> None:
        self.done += 1
        self.bad += status == "failed"
        self._show()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()

    def _show(self) -> None:
        elapsed = time.perf_counter() - self.start
        new = self.done - self.already
        eta = _clock(elapsed / new * (self.total - self.done)) if new else "?"
        failed = f", {self.bad} failed" if self.bad else ""
        self.stream.write(f"\r{self.label}: {self.done}/{self.total} runs{failed}, "
                          f"elapsed {_clock(elapsed)}, ETA {eta}   ")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


__all__ = ["Interrupted", "Job", "Probe", "execute", "job_config", "run_sweep"]
