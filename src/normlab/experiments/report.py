"""report.md and its figures, rendered from the results database alone."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .recipe import Results, Settings, Verdict
from .store import Store


def render(folder: str | Path) -> Path:
    """Write ``folder/report.md`` and its PNG figures from ``folder``'s database."""
    from . import get_recipe

    folder = Path(folder)
    with _open(folder) as store:
        meta, runs = store.meta(), store.runs()
    settings = Settings(**meta["settings"])
    recipe = get_recipe(settings.recipe)
    results = Results(runs)
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "diverged", "failed")}
    lines = [f"# {recipe.title}", "",
             f"Recipe `{recipe.name}` ({'quick' if settings.quick else 'full'} mode), "
             f"seed document `{recipe.seed_doc}`. Runs in the database: "
             f"{len(runs)} ({counts['done']} done, {counts['diverged']} diverged, "
             f"{counts['failed']} failed); compute time {sum(r.wall_time for r in runs):.0f} s "
             f"summed over runs. Figures over seeds are the median and the interquartile "
             f"range (IQR).", "", "## Claims", "",
             "| claim | paper | ours | verdict | why |", "|---|---|---|---|---|"]
    for claim in recipe.claims:
        verdict = _checked(claim, results, settings)
        cells = [f"**{claim.name}**: {claim.statement}", claim.paper, verdict.ours,
                 verdict.verdict, verdict.why]
        # norms are written |x|: escaped so they do not split the table's cells
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Protocol used", ""] + [f"- {line}" for line in recipe.protocol(settings)]
    lines += ["", "## Figures", ""]
    for figure in recipe.figures:
        figure.draw(results, settings, folder / figure.filename)
        lines += [f"![{figure.caption}]({figure.filename})", "", f"*{figure.caption}*", ""]
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["## Failed runs", "", "Rerun the same command to retry them.", ""]
        lines += [f"- `{r.key}` {r.config.get('norm', r.config.get('probe'))}: "
                  f"{r.error.strip().splitlines()[-1]}" for r in failed]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _checked(claim, results: Results, settings: Settings) -> Verdict:
    try:
        return claim.check(results, settings)
    except (KeyError, ValueError, ZeroDivisionError) as err:  # missing runs: say so
        return Verdict("-", "inconclusive", f"could not evaluate: {err!r}")


def runs_csv(folder: str | Path) -> str:
    """One row per run and evaluation point: configuration, status, wall time, metrics."""
    with _open(Path(folder)) as store:
        runs = store.runs()
    config_names = sorted({k for r in runs for k in r.config})
    metric_names = sorted({k for r in runs for point in r.history for k in point})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", *config_names, "status", "wall_time", "point", *metric_names])
    for run in runs:
        config = [run.config.get(k, "") for k in config_names]
        for i, point in enumerate(run.history or [{}]):
            writer.writerow([run.key, *config, run.status, f"{run.wall_time:.3f}",
                             i if point else "", *[point.get(k, "") for k in metric_names]])
    return out.getvalue()


def _open(folder: Path) -> Store:
    from .store import DB_NAME

    if not (folder / DB_NAME).exists():
        raise ValueError(f"no results database at {folder / DB_NAME}; "
                         f"run `normlab reproduce RECIPE --out {folder}` first")
    return Store.in_folder(folder)
