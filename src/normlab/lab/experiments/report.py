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

from .recipe import MIN_SEEDS, Results, Settings, Verdict, decide
from .store import Run, Store


def render(folder: str | Path) -> Path:
    """Write ``folder/report.md`` and its PNG figures from ``folder``'s database."""
    from . import get_recipe

    folder = Path(folder)
    meta, runs = _load(folder)
    settings = Settings(**meta["settings"])
    recipe = get_recipe(settings.recipe)
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "diverged", "failed")}
    protocol_keys = {job.key() for job in recipe.jobs(settings)}
    # the claims judge the mode's runs only: a run of an earlier protocol (an arm since
    # changed) stays in the database and the CSV, but no verdict reads it
    results = Results([r for r in runs if r.key in protocol_keys])
    finished = protocol_keys & {r.key for r in runs if r.status in ("done", "diverged")}
    lines = [f"# {recipe.title}", "",
             f"Recipe `{recipe.name}`, **{settings.mode} mode**, seed document "
             f"`{recipe.seed_doc}`: {len(finished)} of the mode's {len(protocol_keys)} runs "
             f"finished. Runs in the database: "
             f"{len(runs)} ({counts['done']} done, {counts['diverged']} diverged, "
             f"{counts['failed']} failed); wall time {sum(r.wall_time for r in runs):.0f} s "
             f"summed over runs (each run's own clock, so time it waited on a shared or "
             f"paused CPU counts too). Figures over seeds are the median and the interquartile "
             f"range (IQR). A verdict needs {MIN_SEEDS} seeds per compared arm "
             f"(\"indicative\" below that); each claim's rule is printed beside it with the "
             f"date it was fixed, and marked where it was set after this mode's runs existed.",
             ""]
    if len(finished) < len(protocol_keys):
        lines += [f"**Partial: {len(protocol_keys) - len(finished)} of the mode's "
                  f"{len(protocol_keys)} runs are missing** (the sweep stopped before them); "
                  f"the claims that need them say so.", ""]
    if "provenance" in meta:
        where = meta["provenance"]
        lines += [f"Ran on {where['machine']}, {where['date']}, code at commit "
                  f"`{where['commit']}`; exported from `results.db` to `{CSV_NAME}`, from which "
                  f"`normlab report` re-renders this page.", ""]
    lines += ["## Claims", "",
             "| claim | paper | ours | rule | verdict | why |", "|---|---|---|---|---|---|"]
    for claim in recipe.claims:
        verdict = _checked(claim, results, settings)
        cells = [f"**{claim.name}**: {claim.statement}", claim.paper, verdict.ours,
                 claim.rule.describe(settings), verdict.verdict, verdict.why]
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
        return decide(claim, results, settings)
    except (KeyError, ValueError, ZeroDivisionError) as err:  # missing runs: say so
        return Verdict("-", "inconclusive", f"could not evaluate: {err!r}")


CONFIG, EVAL = "config.", "eval."  # the prefixes of configuration and metric columns


def runs_csv(folder: str | Path) -> str:
    """One row per run and evaluation point: ``key``, the configuration (``config.NAME``),
    ``status``, ``wall_time`` (the run's seconds), ``point`` (the evaluation's index) and
    the evaluation's metrics (``eval.NAME``); a run with no point has one row, its eval
    cells empty. A name can be both a setting and a metric (``config.lr``, ``eval.lr``).

    Configuration values are written as Python literals (strings bare), so that
    `runs_from_csv` reads the runs back.
    """
    _, runs = _load(Path(folder))
    config_names = sorted({k for r in runs for k in r.config})
    metric_names = sorted({k for r in runs for point in r.history for k in point})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", *[CONFIG + k for k in config_names], "status", "wall_time", "point",
                     *[EVAL + k for k in metric_names]])
    for run in runs:
        config = [run.config.get(k, "") for k in config_names]
        for i, point in enumerate(run.history or [{}]):
            writer.writerow([run.key, *config, run.status, f"{run.wall_time:.3f}",
                             i if point else "", *[point.get(k, "") for k in metric_names]])
    return out.getvalue()


def runs_from_csv(text: str) -> list[Run]:
    """The runs written by `runs_csv`, in their order (a failed run's traceback is not kept).

    Also reads the exports written before the columns had prefixes (results/*/runs.csv of
    2026-12-02): bare names, configuration before ``status`` and metrics after ``point``.
    """
    rows = csv.reader(io.StringIO(text))
    header = next(rows, [])
    status = header.index("status")  # the first one: a metric may be named so
    config_names = [name.removeprefix(CONFIG) for name in header[1:status]]
    metric_names = [name.removeprefix(EVAL) for name in header[status + 3:]]
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
    (settings, and where and when they ran), and the checkpoints of its unfinished runs;
    render the report there; returns its path."""
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
    _export_checkpoints(source, dest)
    return render(dest)


def _export_checkpoints(source: Path, dest: Path) -> None:
    """The checkpoints of `source`'s unfinished runs, so that a sweep resumed from the export
    (``reproduce --resume-from``) continues them mid-run; the export's older ones go."""
    from .runner import CHECKPOINT_DIR

    kept = {path.name for path in (source / CHECKPOINT_DIR).glob("*.pt")}
    for stale in (dest / CHECKPOINT_DIR).glob("*.pt"):
        if stale.name not in kept:
            stale.unlink()
    for name in sorted(kept):
        (dest / CHECKPOINT_DIR).mkdir(exist_ok=True)
        shutil.copyfile(source / CHECKPOINT_DIR / name, dest / CHECKPOINT_DIR / name)


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
