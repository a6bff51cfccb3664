"""Run a sweep of jobs on an executor, recording each in the store.

A job is a `training.TrainConfig` (a training run) or a `Probe` (a
measurement that trains nothing, such as the lecture's forward-pass claims).
The executor is a `LocalPool` of processes on this machine (the default) or
a `RayCluster` of Ray tasks. Workers only compute; the driver process writes
each finished run to the database in one transaction. Jobs already finished
in the database are skipped, so an interrupted sweep (Ctrl-C, SIGTERM, a
killed worker) resumes where it stopped when the same command runs again.

A training job also checkpoints its whole state every few minutes into
``checkpoints/<job key>.pt`` beside the database (`training.Checkpoint`),
so the rerun continues an unfinished run from its last checkpoint rather
than from scratch; a checkpoint is deleted once its run is stored. The Ray
executor gives the workers the same absolute path: the sweep's folder must be
on storage that the driver and every worker node share, and a run then
resumes on whichever node picks it up.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch

from .. import training
from .store import FINISHED, OutputError, Run, Store

CHECKPOINT_DIR = "checkpoints"  # beside the database


@dataclass(frozen=True)
class Probe:
    """A measurement job: ``fn(seed=seed, **params)`` returns its points (dicts of numbers).

    `fn` must be a module-level function so that workers can find it. A probe
    that reads a dataset says so with `uses_data`; it then also gets the
    sweep's ``data_dir`` (which is not part of its key: results do not depend on it).
    A probe that trains a model says so with `trains`; it then also gets ``checkpoint``
    (a `training.Checkpoint`, or None), which it hands to `training.train`, so that its run
    survives a kill as a training job's does (not part of its key either).
    """

    fn: Callable[..., list[dict]]
    seed: int = 0
    params: dict = field(default_factory=dict)
    uses_data: bool = False
    trains: bool = False
    # raised when what `fn` measures changes: a new key, so a resumed sweep (or one
    # --resume-from an export) measures again rather than copying the old result
    revision: int = 0

    def to_dict(self) -> dict:
        # named by the module's name from before the lab moved (normlab._moved keeps it
        # importable), so committed results and resumed sweeps keep their probes' keys
        module = self.fn.__module__.replace("normlab.lab.", "normlab.", 1)
        revision = {"revision": self.revision} if self.revision else {}  # old keys unchanged
        return {"probe": f"{module}.{self.fn.__qualname__}", "seed": self.seed,
                "params": self.params, **revision}

    def key(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


Job = training.TrainConfig | Probe


def job_config(job: Job) -> dict:
    """The stored configuration; ``kind`` says which of the two job types it is."""
    return {"kind": "probe" if isinstance(job, Probe) else "train", **job.to_dict()}


def execute(job: Job, data_dir=None, checkpoint: training.Checkpoint | None = None) -> Run:
    """Run one job; an exception becomes status ``failed`` with its traceback.

    A training job (or a probe that trains) with a `checkpoint` continues from it when
    it exists and saves its state there as it goes; its wall time then includes the
    time of the interrupted attempts up to their last checkpoint."""
    start = time.perf_counter()
    try:
        if isinstance(job, Probe):
            data_kw = {"data_dir": data_dir} if job.uses_data else {}
            checkpoint_kw = {"checkpoint": checkpoint} if job.trains else {}
            status, history = "done", job.fn(seed=job.seed, **job.params, **data_kw,
                                             **checkpoint_kw)
            wall_time = time.perf_counter() - start
        else:
            result = training.train(job, data_dir=data_dir, checkpoint=checkpoint)
            status, history, wall_time = result.status, result.history, result.wall_time
        error = None
    except Exception:  # a failed run is recorded, not fatal to the sweep
        status, history, error = "failed", [], traceback.format_exc()
        wall_time = time.perf_counter() - start
    return Run(job.key(), job_config(job), status, wall_time, history, error)


def execute_with_threads(job: Job, data_dir, threads: int,
                         checkpoint: training.Checkpoint | None = None) -> Run:
    """`execute` with `threads` torch threads: the CPUs the job was given."""
    torch.set_num_threads(threads)
    return execute(job, data_dir, checkpoint)


class Interrupted(Exception):
    """The sweep stopped early (Ctrl-C, SIGTERM or a dead worker); rerun to resume.

    `signum` is the signal that stopped it (None: a worker died); `exit_status`
    is the shell's convention for it: 130 for SIGINT, 143 for SIGTERM, else 1.
    """

    def __init__(self, reason: str, signum: int | None = None):
        super().__init__(reason)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum if self.signum else 1


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name, signum)


class Executor(abc.ABC):
    """Where a sweep's jobs run. `run_sweep` calls ``start``, iterates ``completed``
    and always calls ``stop``, which cancels whatever has not finished."""

    @abc.abstractmethod
    def start(self, job_count: int) -> None:
        """Get ready to run `job_count` jobs."""

    @abc.abstractmethod
    def completed(self, jobs: list[Job], data_dir,
                  checkpoints: dict[str, training.Checkpoint]) -> Iterator[tuple[Job, Run]]:
        """Submit `jobs` (each with its checkpoint in `checkpoints`, by key, if it has one);
        yield each with its run as it finishes."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Cancel what has not finished and release the workers; safe to call twice."""


def usable_cpus() -> int:
    """The CPUs this process may run on: fewer than the machine's under ``taskset``, where
    more threads than CPUs stall one another at every parallel region's barrier."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class LocalPool(Executor):
    """A process pool on this machine; each worker gets an equal share of the CPUs this
    process may run on (its affinity: ``taskset -c 1`` means one CPU), as torch threads.

    A worker that dies breaks the whole pool (concurrent.futures cannot tell
    whose job it ran), so the sweep stops as `Interrupted` and the rerun
    redoes the unfinished jobs.
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._drained = False  # every submitted job finished

    def start(self, job_count: int) -> None:
        cpus = usable_cpus()
        workers = max(1, min(self.workers or cpus, job_count))
        threads = max(1, cpus // workers)
        # spawn, not fork: a child forked from a parent whose OpenMP pool has run
        # (any earlier torch work) can hang in its first parallel region.
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(threads,))
        self._drained = False

    def completed(self, jobs: list[Job], data_dir,
                  checkpoints: dict[str, training.Checkpoint]) -> Iterator[tuple[Job, Run]]:
        # submit starts the workers; Ctrl-C reaches the whole process group, and a worker
        # still importing torch would print a KeyboardInterrupt traceback, so SIGINT stays
        # blocked (a mask that spawned children inherit) until each ignores it
        with _sigint_blocked():
            job_of = {self._pool.submit(execute, job, data_dir, checkpoints.get(job.key())): job
                      for job in jobs}
        running = set(job_of)
        try:
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield job_of[future], future.result()
            self._drained = True
        except BrokenProcessPool as err:
            raise Interrupted(f"a worker process died ({err})") from err

    def stop(self) -> None:
        if self._pool is None:
            return
        if self._drained:  # idle workers exit and release what they hold; terminated, they
            # would leave their semaphores (tqdm's lock) to the resource tracker's warning
            self._pool.shutdown(wait=True)
            self._pool = None
            return
        # Unfinished runs are simply rerun later. No public way to stop busy
        # workers exists before Python 3.14 (terminate_workers), and shutdown
        # forgets them, so they are collected first.
        workers = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()
        self._pool.shutdown(wait=True)
        self._pool = None


_CAN_MASK = hasattr(signal, "pthread_sigmask")  # not on Windows, where there is no fork+exec


class _sigint_blocked:
    """SIGINT held back in this thread (and in the processes it spawns) while inside;
    one that arrived meanwhile is raised on leaving."""

    def __enter__(self):
        if _CAN_MASK:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc):
        if _CAN_MASK:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _init_worker(threads: int) -> None:
    # Ctrl-C reaches the whole process group: the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _CAN_MASK:  # blocked since the parent spawned this worker (see LocalPool.completed)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # tqdm's default lock is a multiprocessing semaphore; a worker terminated mid-run (an
    # interrupted sweep) would leave it to the resource tracker's "leaked semaphore"
    # warning. A worker is a single process: a thread lock serves.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)


class RayCluster(Executor):
    """Ray tasks on a Ray cluster; this process (the driver) alone writes the results.

    `address` is Ray's: ``"auto"`` joins the cluster that ``ray start`` made on
    this node, ``"HOST:PORT"`` another; None starts a local Ray instance (with
    `num_cpus` CPUs, default all) that ends with the sweep. Each job declares
    `cpus_per_job` CPUs to Ray and runs with as many torch threads. Ray does
    not retry a task whose worker dies (``max_retries=0``): it is recorded as
    failed, and the next sweep reruns it (from its checkpoint, which sits in the
    sweep's folder: that folder must be shared storage, seen at the same
    absolute path by the driver and every worker). Training runs on the CPU,
    so no job asks Ray for a GPU.
    """

    def __init__(self, address: str | None = None, cpus_per_job: int = 1,
                 num_cpus: int | None = None):
        if cpus_per_job < 1:
            raise ValueError(f"cpus_per_job must be >= 1, got {cpus_per_job}")
        if address is not None and num_cpus is not None:
            raise ValueError("num_cpus sizes a local Ray instance; a cluster at an address "
                             "has the CPUs its nodes were started with")
        self.address, self.cpus_per_job, self.num_cpus = address, cpus_per_job, num_cpus
        self._ray = self._task = None
        self._started_ray = False
        self._outstanding: dict = {}

    def start(self, job_count: int) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("the Ray executor needs Ray: pip install 'normlab[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            # "local" always starts a new instance; None would join any cluster found
            try:
                ray.init(address=self.address or "local",
                         **({} if self.address else {"num_cpus": self.num_cpus}))
            except ConnectionError as err:  # no cluster there: Ray's message says what to do
                raise ValueError(f"cannot join a Ray cluster at {self.address!r}: {err}") from None
            self._started_ray = True
        self._task = ray.remote(execute_with_threads).options(
            num_cpus=self.cpus_per_job, max_retries=0)

    def completed(self, jobs: list[Job], data_dir,
                  checkpoints: dict[str, training.Checkpoint]) -> Iterator[tuple[Job, Run]]:
        ray = self._ray
        self._outstanding = {self._task.remote(job, data_dir, self.cpus_per_job,
                                               checkpoints.get(job.key())): job
                             for job in jobs}
        while self._outstanding:
            (ref,), _ = ray.wait(list(self._outstanding), num_returns=1)
            job = self._outstanding.pop(ref)
            try:
                run = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker or its node died, OOM kill
                run = Run(job.key(), job_config(job), "failed", 0.0, [],
                          f"{type(err).__name__}: {err}")
            yield job, run

    def stop(self) -> None:
        for ref in self._outstanding:
            self._ray.cancel(ref, force=True)  # force: stop busy workers too
        self._outstanding = {}
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False


def run_sweep(jobs: list[Job], store: Store, workers: int | None = None, data_dir=None,
              log_path=None, label: str = "sweep", stream=None,
              executor: Executor | None = None, checkpoint_every: float = 300.0) -> dict:
    """Run the jobs not yet finished in `store`; returns counts by status.

    Jobs run on `executor` (default: a `LocalPool` of `workers` processes).
    Each training job checkpoints every `checkpoint_every` seconds (0: never)
    into `checkpoint_for(store, job)` and resumes from there when rerun; its
    checkpoint is deleted once the run is stored as finished (a failed run's is
    kept for the retry). Probes are short and never checkpoint.
    Progress (runs done / total, ETA) goes to `stream` (None: sys.stderr): one line updated in
    place on a terminal, one line per finished run otherwise. One line per
    finished run goes to `log_path`. Raises `Interrupted` when stopped early;
    every run finished before that is in the store.
    """
    if not checkpoint_every >= 0:
        raise ValueError(f"checkpoint_every must be a number of seconds >= 0 (0: no "
                         f"checkpoints), got {checkpoint_every!r}")
    unique = list({job.key(): job for job in jobs}.values())
    finished = store.finished_keys()
    pending = [job for job in unique if job.key() not in finished]
    for job in unique:  # a sweep killed between storing a run and deleting its checkpoint
        if job.key() in finished and isinstance(job, training.TrainConfig):
            checkpoint_for(store, job).remove()
    checkpoints = {job.key(): checkpoint_for(store, job, checkpoint_every) for job in pending
                   if checkpoint_every and trains(job)}
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": len(unique) - len(pending)}
    # sys.stderr as it is now, not at import (pytest's capture, a redirect, may have closed it)
    progress = _Progress(label, len(unique), counts["skipped"], stream or sys.stderr)
    if not pending:
        progress.finish()
        return counts
    executor = executor or LocalPool(workers)
    log = open(log_path, "a") if log_path else None
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        executor.start(len(pending))  # after which SIGTERM is ours (ray.init sets its own)
        signal.signal(signal.SIGTERM, _raise_interrupted)
        for job, run in executor.completed(pending, data_dir, checkpoints):
            # key and config as the driver sees them: a worker may name a job's
            # module differently (__main__ is __mp_main__ there)
            run = dataclasses.replace(run, key=job.key(), config=job_config(job))
            store.record(run)
            if run.status in FINISHED and job.key() in checkpoints:
                checkpoints[job.key()].remove()
            counts[run.status] += 1
            progress.update(run.status)
            if log:
                try:
                    log.write(_log_line(run) + "\n")
                    log.flush()
                except OSError as err:
                    raise OutputError(f"cannot write {log_path}: {err} (run {run.key} is "
                                      f"stored in {store.path})") from err
    except KeyboardInterrupt as err:
        raise Interrupted("SIGINT", signal.SIGINT) from err
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        executor.stop()
        progress.finish()
        if log:
            log.close()
    return counts


def trains(job: Job) -> bool:
    """Whether `job` trains a model, and so checkpoints: a training job, or a probe that
    says it trains."""
    return isinstance(job, training.TrainConfig) or (isinstance(job, Probe) and job.trains)


def checkpoint_for(store: Store, job: Job, seconds: float = 300.0) -> training.Checkpoint:
    """Training `job`'s checkpoint in `store`'s folder, ``checkpoints/<job key>.pt``, by its
    absolute path (what a Ray worker on another node sees of the shared folder)."""
    path = store.path.parent.resolve() / CHECKPOINT_DIR / f"{job.key()}.pt"
    return training.Checkpoint(path, seconds=seconds)


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
    """The sweep's progress: runs done / total, failures, elapsed time and ETA.

    On a terminal one line is rewritten in place; anywhere else (a cluster
    job's log, ``| tee``, CI) each update is a line of its own, so a log never
    piles carriage returns into one line of kilobytes.
    """

    def __init__(self, label: str, total: int, already: int, stream):
        self.label, self.total, self.done, self.stream = label, total, already, stream
        self.already, self.start, self.bad = already, time.perf_counter(), 0
        self.in_place = _is_terminal(stream)
        self._show()

    def update(self, status: str) -> None:
        self.done += 1
        self.bad += status == "failed"
        self._show()

    def finish(self) -> None:
        if self.in_place:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self) -> None:
        elapsed = time.perf_counter() - self.start
        new = self.done - self.already
        eta = _clock(elapsed / new * (self.total - self.done)) if new else "?"
        failed = f", {self.bad} failed" if self.bad else ""
        line = (f"{self.label}: {self.done}/{self.total} runs{failed}, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")
        self.stream.write(f"\r{line}   " if self.in_place else f"{line}\n")
        self.stream.flush()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


__all__ = ["Executor", "Interrupted", "Job", "LocalPool", "Probe", "RayCluster",
           "checkpoint_for", "execute", "job_config", "run_sweep"]
