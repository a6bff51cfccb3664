"""report.md and its figures, rendered from the results database alone.

A results folder is either the ``--out`` folder of `normlab reproduce`
(``results.db``) or an exported one (``runs.csv`` and ``meta.json``: what
the repository's ``results/`` folders hold, the database being a binary
that would not diff); `render` reads either.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .recipe import Results, Settings, Verdict
from .store import Run, Store


def render(folder: str | Path) -> Path:
    """Write ``folder/report.md`` and its PNG figures from ``folder``'s database."""
    from . import get_recipe

    folder = Path(folder)
    meta, runs = _load(folder)
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
             f"range (IQR).", ""]
    protocol_keys = {job.key() for job in recipe.jobs(settings)}
    missing = protocol_keys - {r.key for r in runs if r.status in ("done", "diverged")}
    if missing:
        lines += [f"**Partial: {len(missing)} of the protocol's {len(protocol_keys)} runs are "
                  f"missing** (the sweep stopped before them); the claims that need them "
                  f"say so.", ""]
    if "provenance" in meta:
        where = meta["provenance"]
        lines += [f"Ran on {where['machine']}, {where['date']}, code at commit "
                  f"`{where['commit']}`; exported from `results.db` to `{CSV_NAME}`, from which "
                  f"`normlab report` re-renders this page.", ""]
    lines += ["## Claims", "",
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
    """One row per run and evaluation point: configuration, status, wall time, metrics.

    Configuration values are written as Python literals (strings bare), so that
    `runs_from_csv` reads the runs back.
    """
    _, runs = _load(Path(folder))
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


def runs_from_csv(text: str) -> list[Run]:
    """The runs written by `runs_csv`, in their order (a failed run's traceback is not kept)."""
    rows = csv.reader(io.StringIO(text))
    header = next(rows, [])
    # by position: a metric may share its name with a fixed column ("point")
    status = header.index("status")
    config_names, metric_names = header[1:status], header[status + 3:]
    runs: dict[str, Run] = {}
    for row in rows:
        key, config_cells, (state, wall_time, point) = row[0], row[1:status], \
            row[status:status + 3]
        run = runs.get(key)
        if run is None:
            config = {name: _literal(cell) for name, cell in zip(config_names, config_cells)
                      if cell != ""}
            error = "(traceback not exported)" if state == "failed" else None
            run = runs[key] = Run(key, config, state, float(wall_time), [], error)
        if point != "":
            run.history.append({name: float(cell) for name, cell in
                                zip(metric_names, row[status + 3:]) if cell != ""})
    return list(runs.values())


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: a norm, task or dtype name


def export(source: str | Path, dest: str | Path, commit: str, machine: str,
           date: str | None = None) -> Path:
    """Copy the runs of results folder `source` to `dest` as ``runs.csv`` and ``meta.json``
    (settings, and where and when they ran), render the report there; returns its path."""
    source, dest = Path(source), Path(dest)
    meta, _ = _load(source)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / CSV_NAME).write_text(runs_csv(source))
    date = date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    meta = {"settings": meta["settings"],
            "provenance": {"date": date, "machine": machine, "commit": commit}}
    (dest / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if (source / LOG_NAME).exists():
        shutil.copyfile(source / LOG_NAME, dest / LOG_NAME)
    return render(dest)


CSV_NAME, META_NAME, LOG_NAME = "runs.csv", "meta.json", "log.txt"


def exported_runs(folder: str | Path) -> tuple[dict, list[Run]]:
    """(meta, runs) of an exported folder (``runs.csv`` and ``meta.json``)."""
    folder = Path(folder)
    if not (folder / CSV_NAME).exists() or not (folder / META_NAME).exists():
        raise ValueError(f"{folder} is not an exported results folder: expected "
                         f"{CSV_NAME} and {META_NAME} there (`normlab report --export`)")
    return (json.loads((folder / META_NAME).read_text()),
            runs_from_csv((folder / CSV_NAME).read_text()))


def _load(folder: Path) -> tuple[dict, list[Run]]:
    """(meta, runs) of a results folder: its database, else its exported CSV."""
    from .store import DB_NAME

    if (folder / DB_NAME).exists():
        with Store.in_folder(folder) as store:
            return store.meta(), store.runs()
    if (folder / CSV_NAME).exists() and (folder / META_NAME).exists():
        return exported_runs(folder)
    raise ValueError(f"no results database at {folder / DB_NAME} (nor an exported "
                     f"{CSV_NAME} and {META_NAME}); run `normlab reproduce RECIPE --out "
                     f"{folder}` first")
