"""Reproductions of the papers' experiments: recipes, runner, results store, report.

``reproduce("fastnorm", out="runs/fastnorm", quick=True)`` runs the recipe's
missing jobs (resuming an interrupted sweep), then renders
``runs/fastnorm/report.md``; ``normlab reproduce`` and ``normlab report`` call
this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import data
from .recipe import Claim, Figure, Recipe, Results, Settings, Verdict
from .recipes import enorm, equinorm, fastnorm, lecture, onlinenorm
from .report import LOG_NAME, export, exported_runs, render, runs_csv
from .runner import Executor, Interrupted, LocalPool, Probe, RayCluster, run_sweep
from .store import FINISHED, FolderInUse, FolderLock, OutputError, Store

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    fastnorm.RECIPE, lecture.RECIPE, enorm.RECIPE, equinorm.RECIPE, onlinenorm.RECIPE)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}") from None


def reproduce(name: str, out: str | Path, quick: bool = False, seeds: int | None = None,
              workers: int | None = None, data_dir=None, say=print,
              executor: Executor | None = None, resume_from: str | Path | None = None) -> Path:
    """Run recipe `name` into folder `out` (resuming what is there); returns the report path.

    The jobs run on `executor` (default: a local pool of `workers` processes).
    `resume_from` names an exported folder (``normlab report --export``) of the
    same recipe and settings: its finished runs are copied into `out` first and
    not run again, so a sweep continues on another machine from what was committed.
    When the recipe needs MNIST and it can be neither read nor downloaded,
    the runs use scikit-learn's digits instead and the report says so. Raises
    `FolderInUse` at once when another sweep is running in `out`, and
    `OutputError` when `out` cannot be written or its database is damaged.
    """
    recipe = get_recipe(name)
    out = Path(out)
    seeds = seeds or recipe.seeds[0 if quick else 1]
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    dataset = recipe.dataset
    if dataset == "mnist":
        try:
            data.load("mnist", "test", root=data_dir)
        except data.DataError as err:
            say(f"MNIST unavailable ({err}); falling back to the digits dataset that ships "
                f"with scikit-learn: the paper's numbers are not comparable.")
            dataset = "digits"
    settings = Settings(recipe.name, quick, seeds, dataset)
    jobs = recipe.jobs(settings)  # unknown method names fail here, before any run
    label = f"{name}{' --quick' if quick else ''}"
    with FolderLock(out, command=f"normlab reproduce {label}"), Store.in_folder(out) as store:
        stored = store.meta().get("settings")
        if stored is not None and stored != settings.to_dict():
            raise ValueError(f"{out} holds results of {stored}; use another --out for "
                             f"{settings.to_dict()}")
        store.set_meta(settings=settings.to_dict())
        log_path = out / LOG_NAME
        if resume_from is not None:
            _copy_finished_runs(Path(resume_from), settings, jobs, store, log_path, say)
        run_sweep(jobs, store, workers=workers, data_dir=data_dir, log_path=log_path,
                  label=label, executor=executor)
        return render(out)


def _copy_finished_runs(source: Path, settings: Settings, jobs: list, store: Store,
                        log_path: Path, say) -> None:
    """Record into `store` the finished runs of exported folder `source` that are among
    `jobs` and not yet finished in `store`; a new sweep's log starts as the export's."""
    meta, runs = exported_runs(source)
    if meta.get("settings") != settings.to_dict():
        raise ValueError(f"{source} holds results of {meta.get('settings')}; this sweep has "
                         f"{settings.to_dict()}")
    wanted = {job.key() for job in jobs} - store.finished_keys()
    copied = [run for run in runs if run.key in wanted and run.status in FINISHED]
    for run in copied:
        store.record(run)
    if (source / LOG_NAME).exists() and not log_path.exists():
        shutil.copyfile(source / LOG_NAME, log_path)
    say(f"resumed from {source}: {len(copied)} finished runs copied, "
        f"{len(runs) - len(copied)} left (already here, failed, or not in this recipe)")


__all__ = ["RECIPES", "Claim", "Executor", "Figure", "FolderInUse", "FolderLock", "Interrupted",
           "LocalPool", "OutputError", "Probe", "RayCluster", "Recipe", "Results", "Settings",
           "Store", "Verdict", "export", "get_recipe", "render", "reproduce", "run_sweep",
           "runs_csv"]
