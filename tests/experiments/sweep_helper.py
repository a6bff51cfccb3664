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


def progress_probe(seed: int) -> list[dict]:
    """Opens a progress bar, as training does: tqdm's lock is a semaphore of the worker."""
    from tqdm import tqdm

    tqdm(total=1, disable=True).close()
    return [{"point": 0, "value": seed}]


def failing_probe(seed: int) -> list[dict]:
    raise RuntimeError(f"probe failed on purpose (seed {seed})")


def jobs(count: int, seconds: float, pid_dir: str | None = None) -> list[Probe]:
    return [Probe(slow_probe, seed, {"seconds": seconds, "pid_dir": pid_dir})
            for seed in range(count)]


def main(folder: str, count: int, seconds: float, pid_dir: str | None = None) -> None:
    """A sweep as a program: exit status 130 when interrupted."""
    with Store.in_folder(folder) as store:
        try:
            run_sweep(jobs(count, seconds, pid_dir), store, workers=2)
        except Interrupted:
            sys.exit(130)


def tiny_jobs(settings, norms=("none", "batch")):
    from normlab import training

    return [training.TrainConfig(task="digits-mlp", norm=norm, lr=0.1, batch_size=32, seed=seed,
                                 eval_every=10, model_kw={"hidden": 16}, train_limit=320)
            for norm in norms for seed in range(settings.seeds)] + jobs(settings.seeds, 0.0)


def tiny_recipe(name: str = "tiny", norms=("none", "batch")):
    """A recipe of seconds: two norms on digits, one probe, one claim, one figure."""
    from normlab.experiments import Claim, Figure, Recipe, Verdict
    from normlab.experiments.plots import band_panels
    from normlab.experiments.recipe import final, median_iqr

    def check(results, settings):
        accs = [final(r, "test_acc") for r in results.select(norm="batch")]
        return Verdict(median_iqr(accs), "reproduced" if min(accs) > 0.5 else "not reproduced",
                       "above chance")

    def draw(results, settings, path):
        band_panels(path, [("acc", [(n, [[p["test_acc"] for p in r.history]
                                         for r in results.select(norm=n)]) for n in norms])],
                    None, "evaluation", "accuracy")

    return Recipe(name, "A tiny recipe", "none.txt", lambda s: tiny_jobs(s, norms),
                  [Claim("batch learns", "batch norm beats chance", "> 10%", check)],
                  [Figure("tiny.png", "accuracy", draw)],
                  lambda s: [f"{s.seeds} seeds, 320 digits"], seeds=(2, 3), dataset="digits")
