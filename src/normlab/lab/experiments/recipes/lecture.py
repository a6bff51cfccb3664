"""Recipe `lecture` (seed 002): the lecture's claims about normalization, measured.

* Scaled weight normalization keeps ||f(x)|| close to ||x|| in a residual
  network across depth (up to 100 blocks) and width, unlike plain
  He-initialized and plainly weight-normalized networks.
* Batch normalization is invariant to the scale of the weights,
  BN(cWx) = BN(Wx), and its weight gradient scales as 1/c.
* Weight normalization's SGD update is orthogonal to w, so the norm grows as
  ||w_{t+1}|| = sqrt(1 + c^2) ||w_t|| with c = ||dw|| / ||w||.
* Final training loss against learning rate for none, batch, weight, layer
  and group normalization on the MNIST MLP: which tolerate large rates.

The first three are probes (forward/backward measurements, no training);
the last is a sweep of training runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .... import registry
from ... import training
from ..plots import band_panels
from ..recipe import (
    Claim,
    Figure,
    Recipe,
    Results,
    Rule,
    Settings,
    Verdict,
    fewest,
    final,
    grid,
    median,
    median_iqr,
)
from ..runner import Probe

SCHEMES = ("he", "weight_norm", "scaled_weight_norm")
DEPTHS = (1, 2, 5, 10, 20, 50, 100)  # residual blocks, width 100 ("vary the number of blocks")
WIDTHS = (10, 20, 50, 100, 200, 500)  # width, 10 blocks ("vary width")
SCALES = (0.01, 0.1, 1.0, 10.0, 100.0)  # c in BN(cWx)
SWEEP_NORMS = ("none", "batch", "weight_norm", "layer", "group")
LR_GRID = {True: (0.01, 0.03, 0.1, 0.3, 1.0), False: (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)}
QUICK_TRAIN, QUICK_TEST = 10_000, 1_000


# -- probes ------------------------------------------------------------------

def _row_normalized(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True)


def residual_output_ratio(scheme: str, blocks: int, width: int, generator: torch.Generator,
                          samples: int = 64) -> float:
    """Median ||f(x)|| / ||x|| of a residual MLP, x ~ N(0, I), for one weight scheme.

    Each block is u + s * L2(ReLU(L1(u))). ``he``: W ~ He-normal, s = 1.
    ``weight_norm``: rows of W normalized, gain 1, s = 1. ``scaled_weight_norm``
    (the lecture): rows normalized, L1 scaled by sqrt(2 fan-in / fan-out), L2
    by sqrt(fan-in / fan-out), and s = 1 / blocks.
    """
    x = torch.randn(samples, width, generator=generator, dtype=torch.float64)
    u = x
    for _ in range(blocks):
        w1, w2 = (torch.randn(width, width, generator=generator, dtype=torch.float64)
                  for _ in range(2))
        if scheme == "he":
            w1, w2, s = w1 * math.sqrt(2 / width), w2 * math.sqrt(2 / width), 1.0
        elif scheme == "weight_norm":
            w1, w2, s = _row_normalized(w1), _row_normalized(w2), 1.0
        else:  # fan-in == fan-out here, so the factors are sqrt(2) and 1
            w1, w2, s = math.sqrt(2) * _row_normalized(w1), _row_normalized(w2), 1.0 / blocks
        u = u + s * F.relu(u @ w1.T) @ w2.T
    return float((u.norm(dim=1) / x.norm(dim=1)).median())


def propagation_probe(seed: int, sweep: str, scheme: str) -> list[dict]:
    """||f(x)|| / ||x|| over depth (width 100) or over width (10 blocks)."""
    generator = torch.Generator().manual_seed(seed)
    grid = [(b, 100) for b in DEPTHS] if sweep == "depth" else [(10, w) for w in WIDTHS]
    return [{"blocks": b, "width": w, "ratio": residual_output_ratio(scheme, b, w, generator)}
            for b, w in grid]


def batch_norm_scale_probe(seed: int, features: int = 32, batch: int = 64) -> list[dict]:
    """BN(cWx) against BN(Wx) and c * ||dL/dW(c)|| / ||dL/dW(1)||, for each c in SCALES.

    BN adds eps to the variance, so the exact identity is BN_{c^2 eps}(cWx) =
    BN_eps(Wx): that is what is judged; the departure with eps left fixed (the
    practical case) is recorded beside it.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=generator, dtype=torch.float64)
    weight = torch.randn(features, features, generator=generator, dtype=torch.float64)
    target = torch.randn(batch, features, generator=generator, dtype=torch.float64)
    norm = registry.create("batch", features, dim=1).double()
    eps = norm.eps

    def forward(c: float, scale_eps: bool):
        norm.eps = eps * c**2 if scale_eps else eps
        w = (c * weight).requires_grad_(True)
        out = norm(x @ w.T)
        (grad,) = torch.autograd.grad(F.mse_loss(out, target), w)
        return out.detach(), grad.norm().item()

    reference, reference_grad = forward(1.0, False)
    points = []
    for c in SCALES:
        out, grad = forward(c, True)
        fixed_eps_out, _ = forward(c, False)
        points.append({"c": c, "output_diff": (out - reference).abs().max().item(),
                       "grad_ratio_times_c": c * grad / reference_grad,
                       "output_diff_fixed_eps": (fixed_eps_out - reference).abs().max().item()})
    return points


def weight_norm_update_probe(seed: int, lr: float = 0.5, steps: int = 20) -> list[dict]:
    """Plain SGD on torch's weight_norm parametrization of a linear layer.

    Per step and output unit: cos(w_t, dw) and ||w_{t+1}|| / (sqrt(1 + c^2) ||w_t||).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(20, 5).double())
    direction = layer.parametrizations.weight.original1  # v, whose rows are the w_i
    optimizer = torch.optim.SGD([direction], lr=lr)
    x = torch.randn(128, 20, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (128,), generator=generator)
    points = []
    for step in range(steps):
        before = direction.detach().clone()
        optimizer.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        optimizer.step()
        delta = direction.detach() - before
        cos = F.cosine_similarity(before, delta, dim=1).abs().max().item()
        c = delta.norm(dim=1) / before.norm(dim=1)
        growth = direction.detach().norm(dim=1) / (torch.sqrt(1 + c**2) * before.norm(dim=1))
        points.append({"step": step + 1, "max_abs_cos": cos,
                       "max_growth_error": (growth - 1).abs().max().item(),
                       "norm": direction.detach().norm(dim=1).mean().item()})
    return points


# -- jobs --------------------------------------------------------------------

def jobs(settings: Settings) -> list:
    seeds = range(settings.seeds)
    probes = [Probe(propagation_probe, point.pop("seed"), point)
              for point in grid(sweep=("depth", "width"), scheme=SCHEMES, seed=seeds)]
    probes += [Probe(fn, seed) for fn in (batch_norm_scale_probe, weight_norm_update_probe)
               for seed in seeds]
    limits = dict(train_limit=QUICK_TRAIN, test_limit=QUICK_TEST) if settings.quick else {}
    sweep = [training.TrainConfig(task=f"{settings.dataset}-mlp", epochs=1, batch_size=64,
                                  eval_every=25, **limits, **point)
             # the largest rate first: the claim reads it, so a cut-short sweep still answers
             for point in grid(lr=LR_GRID[settings.quick][::-1], norm=SWEEP_NORMS, seed=seeds)]
    return probes + sweep


# -- claims ------------------------------------------------------------------

def _probe_points(results: Results, fn, **params) -> list[list[dict]]:
    return [r.history for r in results.select(probe=fn, **params)]


def _ratios_at(results: Results, scheme: str, sweep: str, index: int) -> list[float]:
    return [points[index]["ratio"]
            for points in _probe_points(results, propagation_probe, sweep=sweep, scheme=scheme)]


RULE_WITH_RECIPE = "2026-11-21, with the recipe, before its first runs"


def check_propagation(results: Results, settings: Settings) -> Verdict:
    ours = "; ".join(f"{scheme}: {median_iqr(_ratios_at(results, scheme, 'depth', -1))}"
                     for scheme in SCHEMES)
    scaled = [abs(math.log(r)) for sweep in ("depth", "width")
              for points in _probe_points(results, propagation_probe, sweep=sweep,
                                          scheme="scaled_weight_norm") for r in
              (p["ratio"] for p in points)]
    others = [abs(math.log(r)) for scheme in ("he", "weight_norm")
              for r in _ratios_at(results, scheme, "depth", -1)]
    seeds = fewest(*(_probe_points(results, propagation_probe, sweep=sweep, scheme=scheme)
                     for sweep in ("depth", "width") for scheme in SCHEMES))
    if not scaled or not others:
        return Verdict(ours, "inconclusive", "probes missing", seeds)
    if max(scaled) <= 1 and min(others) > 1:  # the lecture's bound: e^-1 <= ratio <= e
        return Verdict(f"at 100 blocks, {ours}", "reproduced",
                       "scaled WN within [1/e, e] at every depth and width; the others outside",
                       seeds)
    return Verdict(f"at 100 blocks, {ours}", "not reproduced",
                   f"scaled WN worst |log ratio| {max(scaled):.2f}, others' best "
                   f"{min(others):.2f} (bound 1)", seeds)


def check_batch_norm(results: Results, settings: Settings) -> Verdict:
    points = [p for run in _probe_points(results, batch_norm_scale_probe) for p in run]
    diff = max((p["output_diff"] for p in points), default=math.nan)
    grad = max((abs(p["grad_ratio_times_c"] - 1) for p in points), default=math.nan)
    fixed = {c: max(p["output_diff_fixed_eps"] for p in points if p["c"] == c)
             for c in sorted({p["c"] for p in points})}
    ours = (f"max |BN(cWx) - BN(Wx)| {diff:.1e}, max |c g(c)/g(1) - 1| {grad:.1e} over c in "
            f"{SCALES} (eps scaled by c^2); with eps fixed at 1e-5 the departure is "
            + ", ".join(f"{d:.0e} at c={c:g}" for c, d in fixed.items()))
    if not points:
        return Verdict(ours, "inconclusive", "probes missing")
    holds = diff < 1e-9 and grad < 1e-9
    return Verdict(ours, "reproduced" if holds else "not reproduced",
                   "exact to float64 rounding; eps breaks it only for small c" if holds else
                   "departs beyond float64 rounding")


def check_weight_norm(results: Results, settings: Settings) -> Verdict:
    runs = _probe_points(results, weight_norm_update_probe)
    cos = [max(p["max_abs_cos"] for p in points) for points in runs]
    growth = [max(p["max_growth_error"] for p in points) for points in runs]
    ours = (f"max |cos(w, dw)| {median_iqr(cos, '{:.1e}')}; max relative error of "
            f"sqrt(1+c^2) growth {median_iqr(growth, '{:.1e}')}")
    if not runs:
        return Verdict(ours, "inconclusive", "probes missing")
    holds = max(cos) < 1e-9 and max(growth) < 1e-9
    return Verdict(ours, "reproduced" if holds else "not reproduced",
                   "exact to float64 rounding over 20 SGD steps" if holds else
                   "departs beyond float64 rounding")


def final_losses(results: Results, settings: Settings, norm: str, lr: float) -> list[float]:
    """Final training loss per seed; a diverged run counts as infinite loss."""
    runs = results.select(kind="train", norm=norm, lr=lr)
    return [math.inf if r.status == "diverged" else final(r, "train_loss")
            for r in runs if r.status != "failed"]


def check_learning_rate(results: Results, settings: Settings) -> Verdict:
    top = LR_GRID[settings.quick][-1]
    losses = {norm: final_losses(results, settings, norm, top) for norm in SWEEP_NORMS}
    medians = {norm: median(values) for norm, values in losses.items()}
    diverged = {norm: sum(map(math.isinf, values)) for norm, values in losses.items()}
    ours = f"final train loss at lr {top} (diverged seeds): " + ", ".join(
        f"{norm} {medians[norm]:.3g} ({diverged[norm]}/{len(losses[norm])})"
        for norm in SWEEP_NORMS)
    seeds = fewest(*losses.values())
    if not seeds:
        return Verdict(ours, "inconclusive", "runs missing", seeds)
    normalized = [n for n in SWEEP_NORMS if n != "none"]
    behind = [n for n in normalized if medians[n] >= medians["none"]]
    unstable = [n for n in normalized if 2 * diverged[n] >= len(losses[n])]
    if not behind and not unstable:
        return Verdict(ours, "reproduced", "every normalized network ends below the "
                       "unnormalized one at the largest rate, and none diverges in half of its "
                       "seeds or more", seeds)
    if len(behind) == len(normalized) or unstable:
        return Verdict(ours, "not reproduced", "at the largest rate, not below 'none': "
                       f"{', '.join(behind) or 'none of them'}; diverged in half of the seeds "
                       f"or more: {', '.join(unstable) or 'none of them'}", seeds)
    return Verdict(ours, "inconclusive", f"not below 'none' at the largest rate: "
                   f"{', '.join(behind)}", seeds)


# -- figures -----------------------------------------------------------------

def _draw_propagation(results: Results, path, sweep: str) -> None:
    grid = DEPTHS if sweep == "depth" else WIDTHS
    lines = [(scheme, [[p["ratio"] for p in points] for points in
                       _probe_points(results, propagation_probe, sweep=sweep, scheme=scheme)])
             for scheme in SCHEMES]
    title = "vary blocks (width 100)" if sweep == "depth" else "vary width (10 blocks)"
    band_panels(path, [(title, lines)], grid, "residual blocks" if sweep == "depth" else "width",
                "||f(x)|| / ||x||", logx=True, logy=True)


def draw_depth(results: Results, settings: Settings, path) -> None:
    _draw_propagation(results, path, "depth")


def draw_width(results: Results, settings: Settings, path) -> None:
    _draw_propagation(results, path, "width")


def draw_learning_rate(results: Results, settings: Settings, path) -> None:
    lrs = LR_GRID[settings.quick]
    lines = []
    for norm in SWEEP_NORMS:
        per_seed: dict[int, list[float]] = {}
        for lr in lrs:
            for run in results.select(kind="train", norm=norm, lr=lr):
                loss = final(run, "train_loss")
                per_seed.setdefault(run.config["seed"], []).append(
                    np.nan if loss is None else loss)
        lines.append((norm, list(per_seed.values())))
    band_panels(path, [("final training loss (diverged: gap)", lines)], lrs, "learning rate",
                "training loss", logx=True, logy=True)


def draw_weight_norm(results: Results, settings: Settings, path) -> None:
    runs = _probe_points(results, weight_norm_update_probe)
    band_panels(path, [("weight norm grows under SGD", [
        ("mean ||w_t||", [[p["norm"] for p in points] for points in runs])])],
        None, "SGD step", "||w||")


def protocol(settings: Settings) -> list[str]:
    data = ("MNIST" if settings.dataset == "mnist" else
            "scikit-learn digits (MNIST unavailable)")
    lines = [
        "Propagation: residual MLP blocks u + s L2(ReLU(L1(u))) in float64, x ~ N(0, I), 64 "
        f"inputs; blocks {DEPTHS} at width 100 and widths {WIDTHS} at 10 blocks; weights "
        "drawn at random (the lecture's claim is at initialization), written from the "
        "lecture's equations.",
        f"Batch norm scale: torch BatchNorm1d (training mode), 32 features, batch 64, "
        f"c in {SCALES}, float64.",
        "Weight norm update: torch's weight_norm parametrization of Linear(20, 5), plain SGD "
        "lr 0.5 on the direction v, 20 steps, float64.",
        f"Learning-rate sweep: {data}, {training.mlp_widths(f'{settings.dataset}-mlp')} MLP, "
        f"norms {', '.join(SWEEP_NORMS)}, "
        f"lr {LR_GRID[settings.quick]}, batch 64, one epoch of SGD without momentum, float32; "
        "final training loss = mean over the last 25 steps; a diverged run counts as infinite.",
        f"Seeds: {settings.seeds} per configuration (probes and runs).",
    ]
    if settings.quick:
        lines.append(f"Quick mode: the first {QUICK_TRAIN} training and {QUICK_TEST} test "
                     f"samples, five learning rates.")
    return lines


RECIPE = Recipe(
    name="lecture",
    title="Normalization lecture: claims measured (seed 002)",
    seed_doc="002_277d85dc69c85390.txt",
    jobs=jobs,
    claims=[
        Claim("scaled WN", "scaled weight normalization keeps ||f(x)|| near ||x|| across depth "
              "and width", "e^-2 <= ||f(x)||^2 / ||x||^2 <= e^2 (large B and width)",
              check_propagation,
              Rule("reproduced when scaled weight normalization's ||f(x)|| / ||x|| stays within "
                   "[1/e, e] at every depth and width (the lecture's bound) and both other "
                   "schemes leave it at 100 blocks", RULE_WITH_RECIPE)),
        Claim("BN scale invariance", "BN(cWx) = BN(Wx); gradient scales as 1/c",
              "exact (up to eps)", check_batch_norm,
              Rule("reproduced when both departures stay below 1e-9 (float64 rounding) for "
                   "every c", RULE_WITH_RECIPE), deterministic=True),
        Claim("WN update", "dw is orthogonal to w; ||w_{t+1}|| = sqrt(1 + c^2) ||w_t||",
              "exact", check_weight_norm,
              Rule("reproduced when |cos(w, dw)| and the growth error stay below 1e-9 (float64 "
                   "rounding) over 20 SGD steps", RULE_WITH_RECIPE), deterministic=True),
        Claim("large learning rates", "normalized networks tolerate large learning rates",
              "qualitative (robust to the choice of learning rate)", check_learning_rate,
              Rule("at the largest rate: reproduced when every normalized network's median "
                   "final training loss is below the unnormalized one's and none diverges in "
                   "half of its seeds or more; not reproduced when all are behind or one "
                   "diverges that often", "2026-12-03 (the divergence count added)",
                   ("quick", "full"))),
    ],
    figures=[
        Figure("lecture_depth.png", "||f(x)|| / ||x|| against the number of residual blocks "
               "(width 100), median and IQR over seeds", draw_depth),
        Figure("lecture_width.png", "||f(x)|| / ||x|| against width (10 residual blocks)",
               draw_width),
        Figure("lecture_learning_rate.png", "Final training loss against learning rate on the "
               "MNIST MLP, median and IQR over seeds", draw_learning_rate),
        Figure("lecture_weight_norm.png", "Weight norm under SGD with weight normalization",
               draw_weight_norm),
    ],
    protocol=protocol,
)
