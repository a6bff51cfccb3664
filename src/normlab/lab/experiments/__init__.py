"""Reproductions of the papers' experiments: recipes, runner, results store, report.

``reproduce("fastnorm", out="runs/fastnorm", quick=True)`` runs the recipe's
missing jobs (resuming an interrupted sweep), then renders
``runs/fastnorm/report.md``; ``normlab reproduce`` and ``normlab report`` call
this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import data, training
from .recipe import Claim, Figure, Recipe, Results, Rule, Settings, Verdict, decide
from .recipes import enorm, equinorm, fastnorm, lecture, onlinenorm
from .report import LOG_NAME, export, exported_runs, render, runs_csv
from .runner import (
    CHECKPOINT_DIR,
    Executor,
    Interrupted,
    LocalPool,
    Probe,
    RayCluster,
    run_sweep,
)
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
              executor: Executor | None = None, resume_from: str | Path | None = None,
              protocol: str = "full", checkpoint_every: float = 300.0) -> Path:
    """Run recipe `name` into folder `out` (resuming what is there); returns the report path.

    `protocol` is "full" or "decisive" (ignored with `quick`); the recipe
    says which modes it has. The jobs run on `executor` (default: a local
    pool of `workers` processes). `resume_from` names an exported folder
    (``normlab report --export``) of the same recipe and dataset: those of its
    finished runs that this sweep also runs (the same configuration, whatever
    the mode) are copied into `out` first and not run again, so a sweep
    continues on another machine from what was committed. Each training run
    checkpoints every `checkpoint_every` seconds (0: never) into
    ``out/checkpoints``, so a rerun continues an unfinished run mid-way.
    When the recipe needs MNIST and it can be neither read nor downloaded,
    the runs use scikit-learn's digits instead and the report says so. Raises
    `FolderInUse` at once when another sweep is running in `out`, `OutputError`
    when `out` cannot be written or its database is damaged, and `data.DataError`
    before any run when another dataset its runs need (CIFAR-10) is missing.
    """
    recipe = get_recipe(name)
    out = Path(out)
    mode = "quick" if quick else protocol
    if mode not in recipe.seeds:
        raise ValueError(f"recipe {name!r} has no {mode} protocol; expected one of "
                         f"{recipe.modes()}")
    seeds = seeds or recipe.seeds[mode]
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
    settings = Settings(recipe.name, quick, seeds, dataset, protocol="full" if quick else protocol)
    jobs = recipe.jobs(settings)  # unknown method names fail here, before any run
    for needed in sorted({training.TASKS[job.task].dataset for job in jobs
                          if isinstance(job, training.TrainConfig)} - {"digits"}):
        data.load(needed, "test", root=data_dir)  # a DataError now, not a sweep of failed runs
    label = f"{name} --{'quick' if quick else f'protocol {protocol}'}"
    with FolderLock(out, command=f"normlab reproduce {label}"), Store.in_folder(out) as store:
        stored = store.meta().get("settings")
        if stored is not None and Settings(**stored) != settings:
            raise ValueError(f"{out} holds results of {stored}; use another --out for "
                             f"{settings.to_dict()}")
        store.set_meta(settings=settings.to_dict())
        log_path = out / LOG_NAME
        if resume_from is not None:
            _copy_finished_runs(Path(resume_from), settings, jobs, store, log_path, say)
        run_sweep(jobs, store, workers=workers, data_dir=data_dir, log_path=log_path,
                  label=label, executor=executor, checkpoint_every=checkpoint_every)
        return render(out)


def _copy_finished_runs(source: Path, settings: Settings, jobs: list, store: Store,
                        log_path: Path, say) -> None:
    """Record into `store` the finished runs of exported folder `source` that are among
    `jobs` and not yet finished in `store`; a new sweep's log starts as the export's, and
    an unfinished run continues from the export's checkpoint of it, where it has one.

    A run's key hashes its whole configuration, so runs of another mode of the same recipe
    and dataset are copied only where this sweep runs exactly the same configuration."""
    meta, runs = exported_runs(source)
    theirs = Settings(**meta["settings"]) if "settings" in meta else None
    if theirs is None or (theirs.recipe, theirs.dataset) != (settings.recipe, settings.dataset):
        raise ValueError(f"{source} holds results of {meta.get('settings')}; this sweep has "
                         f"{settings.to_dict()}")
    wanted = {job.key() for job in jobs} - store.finished_keys()
    copied = [run for run in runs if run.key in wanted and run.status in FINISHED]
    for run in copied:
        store.record(run)
    resumable = [path for path in sorted((source / CHECKPOINT_DIR).glob("*.pt"))
                 if path.stem in wanted - {run.key for run in copied}
                 and not (store.path.parent / CHECKPOINT_DIR / path.name).exists()]
    for path in resumable:
        (store.path.parent / CHECKPOINT_DIR).mkdir(exist_ok=True)
        shutil.copyfile(path, store.path.parent / CHECKPOINT_DIR / path.name)
    if theirs == settings and (source / LOG_NAME).exists() and not log_path.exists():
        shutil.copyfile(source / LOG_NAME, log_path)
    say(f"resumed from {source}: {len(copied)} finished runs copied, "
        f"{len(runs) - len(copied)} left (already here, failed, or not in this recipe)"
        + (f"; {len(resumable)} unfinished runs continue from its checkpoints"
           if resumable else ""))


__all__ = ["RECIPES", "Claim", "Executor", "Figure", "FolderInUse", "FolderLock", "Interrupted",
           "LocalPool", "OutputError", "Probe", "RayCluster", "Recipe", "Results", "Rule",
           "Settings", "Store", "Verdict", "decide", "export", "get_recipe", "render",
           "reproduce", "run_sweep", "runs_csv"]
