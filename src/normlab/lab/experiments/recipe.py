"""Recipes: the runs a paper's experiment needs and the claims it checks.

A `Recipe` declares its jobs for a `Settings` (its mode: quick, decisive or
full; the number of seeds; the task actually used), its claims (each with the
paper's figure, the rule that decides it, fixed before the runs it judges, and
a `check` that turns the stored runs into our figure and a verdict), its
figures and the protocol it follows. Statistics over seeds are the median and
interquartile range (seed 004, section 6.5), never a single run; `decide`
turns a verdict on fewer than `MIN_SEEDS` seeds per compared arm into
"indicative", and one on fewer seeds than the mode runs into "inconclusive".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .runner import Job, Probe
from .store import Run

DECIDED = ("reproduced", "not reproduced")
VERDICTS = (*DECIDED, "indicative", "inconclusive")
MIN_SEEDS = 3  # seeds per compared arm below which a verdict is only "indicative"
PROTOCOLS = ("full", "decisive")  # the modes besides quick


@dataclass(frozen=True)
class Settings:
    """How a recipe is run: mode, seeds and the task actually used (after any fallback).

    `protocol` is "full" (the paper's protocol as far as a CPU allows) or
    "decisive" (the fewest runs that decide every claim on `MIN_SEEDS`
    seeds); quick mode ignores it.
    """

    recipe: str
    quick: bool
    seeds: int
    dataset: str = "mnist"  # "digits" when MNIST was unavailable
    protocol: str = "full"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")

    @property
    def mode(self) -> str:
        """"quick", "decisive" or "full"."""
        return "quick" if self.quick else self.protocol

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    ours: str  # our figure: median [IQR] over seeds, or counts
    verdict: str  # one of VERDICTS
    why: str
    seeds: int | None = None  # the fewest finished seeds behind any compared arm

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Rule:
    """What decides a claim, in words, and when it was fixed.

    `seen` names the modes whose runs existed when the rule was (last) fixed:
    their reports mark it as set after its runs.
    """

    words: str
    fixed: str  # a date, and what had run by then
    seen: tuple[str, ...] = ()

    def describe(self, settings: Settings) -> str:
        after = "; **set after this mode's runs existed**" if settings.mode in self.seen else ""
        return f"{self.words} (fixed {self.fixed}{after})"


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    paper: str  # the paper's figure, as the paper states it
    check: Callable[[Results, Settings], Verdict]
    rule: Rule
    # an exact measurement (no seed noise), decided without the seed count
    deterministic: bool = False


def decide(claim: Claim, results: Results, settings: Settings) -> Verdict:
    """The claim's verdict: its check's, unless too few seeds stand behind it.

    A check's verdict rests on `Verdict.seeds` seeds per compared arm. Fewer
    than the mode runs: runs are missing ("inconclusive"); fewer than
    `MIN_SEEDS` (the mode runs too few): "indicative". Either way the report
    says which way the numbers lean.
    """
    verdict = claim.check(results, settings)
    if verdict.verdict not in DECIDED or claim.deterministic:
        return verdict
    if verdict.seeds is None:
        raise RuntimeError(f"claim {claim.name!r}: its check must say how many seeds per "
                           f"compared arm its verdict rests on (Verdict.seeds)")
    leans = f"leans '{verdict.verdict}' on {verdict.seeds} seed(s) per compared arm"
    if verdict.seeds < settings.seeds:
        return Verdict(verdict.ours, "inconclusive", f"runs missing: {verdict.why}; {leans} "
                       f"of the {settings.seeds} this mode runs", verdict.seeds)
    if verdict.seeds < MIN_SEEDS:
        return Verdict(verdict.ours, "indicative", f"{verdict.why}; {leans}, and a verdict "
                       f"needs {MIN_SEEDS}", verdict.seeds)
    return verdict


def fewest(*arms: Sequence) -> int:
    """The number of seeds of the arm with the fewest: what a comparison rests on."""
    return min((len(arm) for arm in arms), default=0)


@dataclass(frozen=True)
class Figure:
    filename: str
    caption: str
    draw: Callable[[Results, Settings, Path], None]  # writes the PNG at the given path


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    seed_doc: str  # the seed file it reproduces
    jobs: Callable[[Settings], list[Job]]
    claims: Sequence[Claim]
    figures: Sequence[Figure]
    protocol: Callable[[Settings], list[str]]  # lines: what was run, how the mode differs
    seeds: dict[str, int] = field(  # default number of seeds by mode
        default_factory=lambda: {"quick": 3, "full": 5})
    dataset: str = "mnist"  # the dataset its training runs need (digits is the fallback)

    def modes(self) -> list[str]:
        return list(self.seeds)


def grid(**axes: Sequence) -> list[dict]:
    """Every combination of the axes' values, as dicts, the last axis varying fastest.

    A recipe declares its runs as grids of parameters (``grid(norm=NORMS,
    lr=LRS, seed=range(3))``), concatenated when its variants differ.
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"grid axis {name!r} must be a sequence of values, got {values!r}")
    names = list(axes)
    return [dict(zip(names, point)) for point in itertools.product(*axes.values())]


def parameters(run: Run) -> dict:
    """A run's parameters, flat: a training run's configuration, or a probe's name, seed and
    keyword parameters."""
    return {**run.config, **run.config.get("params", {})}


class Results:
    """The stored runs of a recipe, selectable by their parameters."""

    def __init__(self, runs: Sequence[Run]):
        self.runs = list(runs)

    def select(self, **where) -> list[Run]:
        """Runs whose parameters (see `parameters`) have every given value, ordered by seed.

        ``probe=fn`` selects the runs of the probe function `fn`.
        """
        if callable(where.get("probe")):
            where["probe"] = Probe(where["probe"]).to_dict()["probe"]
        chosen = []
        for run in self.runs:
            params = parameters(run)
            if all(params.get(k) == v for k, v in where.items()):
                chosen.append(run)
        return sorted(chosen, key=lambda r: r.config.get("seed", 0))

    def by_seed(self, **where) -> dict[int, Run]:
        return {r.config["seed"]: r for r in self.select(**where)}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); NaNs when `values` is empty.

    An infinite value (a diverged run's loss) stays infinite, and so does a
    quartile that interpolates towards it (numpy would give inf - inf = NaN).
    """
    if len(values) == 0:
        return (float("nan"),) * 3
    huge = np.finfo(float).max
    finite = np.nan_to_num(np.asarray(values, dtype=float), posinf=huge, neginf=-huge)
    quarts = np.percentile(finite, [25, 50, 75])
    quarts = np.where(np.abs(quarts) >= huge / 4, np.copysign(np.inf, quarts), quarts)
    return float(quarts[0]), float(quarts[1]), float(quarts[2])


def median(values: Sequence[float]) -> float:
    """The median (NaN when `values` is empty; a diverged run's infinite loss stays infinite)."""
    return quartiles(values)[1]


def median_iqr(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """"median [q1, q3] (n=...)", the way every comparison is reported."""
    if len(values) == 0:
        return "no runs"
    q1, median, q3 = quartiles(values)
    return (f"{fmt.format(median)} [IQR {fmt.format(q1)}, {fmt.format(q3)}] "
            f"(n={len(values)})")


def final(run: Run, metric: str) -> float | None:
    """The metric at the last evaluation of a finished run; None if it diverged or failed."""
    if run.status != "done" or not run.history:
        return None
    return run.history[-1].get(metric)
