"""Jobs for the runner tests, importable by the pool's workers and by a child sweep."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from normlab.experiments import Probe, Store, run_sweep
from normlab.experiments.runner import Interrupted

POINTS = 5


def points(seed: int) -> list[dict]:
    return [{"point": i, "value": seed * 100 + i} for i in range(POINTS)]


def assert_alive_before(process: subprocess.Popen, deadline: float) -> None:
    """Fails when `process` has exited or the `time.monotonic()` `deadline` has passed,
    with its stderr, read once the process is killed (a live process's never ends)."""
    if process.poll() is None and time.monotonic() < deadline:
        return
    ended = process.poll() is not None
    process.kill()
    try:
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired as held:  # its workers still hold the pipe: what came
        err = (held.stderr or b"").decode(errors="replace")
    raise AssertionError(f"{'exited' if ended else 'still waiting at the deadline'}: {err}")


def slow_probe(seed: int, seconds: float, pid_dir: str | None = None) -> list[dict]:
    """Sleeps, then returns POINTS evaluation points; announces its worker's pid."""
    if pid_dir:
        (Path(pid_dir) / str(os.getpid())).touch()
    time.sleep(seconds)
    return points(seed)


def gated_probe(seed: int, gate: str, pid_dir: str) -> list[dict]:
    """Opens a progress bar, as training does (tqdm's lock), announces its worker's pid and
    waits while the file `gate` exists (2 minutes at most)."""
    from tqdm import tqdm

    tqdm(total=1, disable=True).close()
    (Path(pid_dir) / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return points(seed)


def dying_probe(seed: int, marker: str) -> list[dict]:
    """Kills its own worker the first time, when the file `marker` does not exist yet."""
    if not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return points(seed)


def progress_probe(seed: int) -> list[dict]:
    """Opens a progress bar, as training does: tqdm's lock is a semaphore of the worker."""
    from tqdm import tqdm

    tqdm(total=1, disable=True).close()
    return [{"point": 0, "value": seed}]


def threads_probe(seed: int) -> list[dict]:
    """The torch threads its worker was given."""
    import torch

    return [{"point": 0, "value": torch.get_num_threads()}]


def failing_probe(seed: int) -> list[dict]:
    raise RuntimeError(f"probe failed on purpose (seed {seed})")


def flaky_probe(seed: int, marker: str) -> list[dict]:
    """Fails the first time, when the file `marker` does not exist yet; then succeeds."""
    if not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError(f"probe failed once on purpose (seed {seed})")
    return slow_probe(seed, 0.0)


def jobs(count: int, seconds: float, pid_dir: str | None = None) -> list[Probe]:
    return [Probe(slow_probe, seed, {"seconds": seconds, "pid_dir": pid_dir})
            for seed in range(count)]


def main(folder: str, count: int, seconds: float, pid_dir: str | None = None,
         gate: str | None = None) -> None:
    """A sweep as a program: when interrupted, the exit status of `Interrupted` (130 for
    SIGINT, 143 for SIGTERM, 1 for a dead worker). With `gate`, two probes of 0.2 s, then
    `count - 2` that wait while `gate` exists (`seconds` unused)."""
    sweep = (jobs(count, seconds, pid_dir) if gate is None
             else gated_jobs(2, count - 2, gate, pid_dir))
    hear_ctrl_c()
    with Store.in_folder(folder) as store:
        try:
            run_sweep(sweep, store, workers=2)
        except Interrupted as err:
            sys.exit(err.exit_status)


def probe_recipe(jobs: list[Probe], name: str = "probes"):
    """A recipe of the given probes, with no claim and no figure."""
    from normlab.experiments import Recipe

    return Recipe(name, "Probes", "none.txt", lambda settings: jobs, [], [],
                  lambda settings: [f"{len(jobs)} probes"], seeds={"quick": 1, "full": 1},
                  dataset="digits")


def gated_jobs(fast: int, gated: int, gate: str, pid_dir: str) -> list[Probe]:
    """`fast` probes of 0.2 s, then `gated` probes that wait while `gate` exists."""
    return jobs(fast, 0.2) + [Probe(gated_probe, seed, {"gate": gate, "pid_dir": pid_dir})
                              for seed in range(fast, fast + gated)]


def reproduce_main(out: str, fast: int, gated: int, gate: str, pid_dir: str, *options) -> None:
    """`normlab reproduce probes --out OUT OPTIONS` as a program, on `gated_jobs`."""
    from normlab import cli, experiments

    experiments.RECIPES["probes"] = probe_recipe(gated_jobs(fast, gated, gate, pid_dir))
    hear_ctrl_c()
    sys.exit(cli.main(["reproduce", "probes", "--out", out, *options]))


def hear_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt here even when the tests run as a background job
    of a shell (`make test &`), whose children start with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def full_disk_main(folder: str, count: int, spare_bytes: int) -> None:
    """A sweep on a disk that fills up: no file may grow past the database's size at the
    start plus `spare_bytes` (RLIMIT_FSIZE, which binds root too). Exit status 1 on
    `OutputError`, whose message goes to stderr."""
    import resource

    from normlab.experiments import OutputError

    with Store.in_folder(folder) as store:
        limit = store.path.stat().st_size + spare_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            run_sweep(jobs(count, 0.0), store, workers=1, log_path=Path(folder) / "log.txt")
        except OutputError as err:
            print(err, file=sys.stderr)
            sys.exit(1)


def tiny_jobs(settings, norms=("none", "batch")):
    from normlab import training

    return [training.TrainConfig(task="digits-mlp", norm=norm, lr=0.1, batch_size=32, seed=seed,
                                 eval_every=10, model_kw={"hidden": 16}, train_limit=320)
            for norm in norms for seed in range(settings.seeds)] + jobs(settings.seeds, 0.0)


def tiny_recipe(name: str = "tiny", norms=("none", "batch")):
    """A recipe of seconds: two norms on digits, one probe, one claim, one figure."""
    from normlab.experiments import Claim, Figure, Recipe, Rule, Verdict
    from normlab.experiments.plots import band_panels
    from normlab.experiments.recipe import final, median_iqr

    def check(results, settings):
        accs = [final(r, "test_acc") for r in results.select(norm="batch")]
        return Verdict(median_iqr(accs), "reproduced" if min(accs) > 0.5 else "not reproduced",
                       "above chance", len(accs))

    def draw(results, settings, path):
        band_panels(path, [("acc", [(n, [[p["test_acc"] for p in r.history]
                                         for r in results.select(norm=n)]) for n in norms])],
                    None, "evaluation", "accuracy")

    return Recipe(name, "A tiny recipe", "none.txt", lambda s: tiny_jobs(s, norms),
                  [Claim("batch learns", "batch norm beats chance", "> 10%", check,
                         Rule("every seed above 50%", "with the test"))],
                  [Figure("tiny.png", "accuracy", draw)],
                  lambda s: [f"{s.seeds} seeds, 320 digits"], seeds={"quick": 2, "full": 3},
                  dataset="digits")


def training_job():
    """A training run of about a second: 16 steps of a small digits MLP, evaluated every 5."""
    from normlab import training

    return training.TrainConfig(task="digits-mlp", norm="online", lr=0.05, epochs=2,
                                batch_size=16, train_limit=128, test_limit=200, eval_every=5,
                                model_kw={"hidden": 32})


RESUMED_MARK = -1.0


def plant_checkpoint(store: Store, job) -> Path:
    """Leave `job`'s checkpoint in `store`'s folder as a sweep killed at step 10 would (saved
    at step 9), with its first evaluation's test accuracy set to RESUMED_MARK: a run that
    continued from it reports that mark, one that started over does not. Returns its path."""
    import torch

    from normlab import training
    from normlab.experiments.runner import checkpoint_for

    path = checkpoint_for(store, job).path
    checkpoint = training.Checkpoint(path, steps=3)

    def kill_at_step_10(point):
        if point["step"] >= 10:
            raise Interrupted("killed")
    try:
        training.train(job, checkpoint=checkpoint, on_eval=kill_at_step_10)
    except Interrupted:
        pass
    state = torch.load(path, weights_only=True)
    assert state["step"] == 9 and [p["step"] for p in state["history"]] == [5]
    state["history"][0]["test_acc"] = RESUMED_MARK
    checkpoint.save(state)
    return path


def training_probe(seed: int, checkpoint=None) -> list[dict]:
    """A probe that trains (`training_job`), from and into the sweep's `checkpoint`, and
    returns the run's last test accuracy."""
    from normlab import training

    result = training.train(training_job(), checkpoint=checkpoint)
    return [{"point": 0, "value": result.final["test_acc"]}]
