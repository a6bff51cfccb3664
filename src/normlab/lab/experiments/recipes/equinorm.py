"""Recipe `equinorm` (seed 004, sections 6.1, 6.2, 6.5): EquiNorm against BatchNorm on CIFAR-10.

A CIFAR ResNet with BatchNorm, GroupNorm, EquiNorm, and EquiNorm whose
statistics come from the first quarter of each batch (section 6.1's fix for
overfitting); random flips and crops, SGD with momentum 0.9, weight decay
1e-4, batch 128, learning rate 0.1 divided by 10 at 50% and 75% of training
(epochs 150 and 225 of 300 in the paper); test accuracy and loss every epoch,
median and IQR over seeds (section 6.5). Section 6.2's short schedule is run
scaled down: a tenth of the epochs with a linear decay (the paper's one-cycle
"super-convergence" schedule and manifold mixup are not in the training loop).
"""

from __future__ import annotations

import math

from ... import training
from ..plots import band_panels
from ..recipe import (
    Claim,
    Figure,
    Recipe,
    Results,
    Settings,
    Verdict,
    final,
    grid,
    median,
    median_iqr,
)

VARIANTS = {  # label -> (norm, norm keywords)
    "BatchNorm": ("batch", {}),
    "GroupNorm": ("group", {}),
    "EquiNorm": ("equinorm", {}),
    "EquiNorm, first-quarter stats": ("equinorm", {"stat_fraction": 0.25}),
}
MODEL = {False: {"depth": 20, "width": 16}, True: {"depth": 8, "width": 8}}
EPOCHS = {False: 40, True: 4}  # the long schedule; the short one gets a tenth (at least 2)
LIMITS = {False: (None, None), True: (5_000, 1_000)}  # first train / test samples
EARLY = 0.25  # "early epochs": the first quarter of training


def _config(settings: Settings, label: str, seed: int, short: bool) -> training.TrainConfig:
    norm, norm_kw = VARIANTS[label]
    epochs = max(2, EPOCHS[settings.quick] // 10) if short else EPOCHS[settings.quick]
    train_limit, test_limit = LIMITS[settings.quick]
    return training.TrainConfig(
        task="cifar10-resnet", norm=norm, lr=0.1, epochs=epochs, batch_size=128, seed=seed,
        momentum=0.9, weight_decay=1e-4, lr_schedule="linear" if short else "step",
        train_limit=train_limit, test_limit=test_limit, model_kw=MODEL[settings.quick],
        norm_kw=norm_kw, standardize=norm != "equinorm")  # section 5.2: raw pixels for EquiNorm


def jobs(settings: Settings) -> list[training.TrainConfig]:
    # seed by seed, every variant and schedule: a sweep cut short still answers every claim
    return [_config(settings, **point)
            for point in grid(seed=range(settings.seeds), short=(False, True), label=VARIANTS)]


def runs(results: Results, label: str, short: bool = False):
    norm, norm_kw = VARIANTS[label]
    schedule = "linear" if short else "step"
    return [r for r in results.select(kind="train", norm=norm, norm_kw=norm_kw,
                                      lr_schedule=schedule) if r.status != "failed"]


def curves(results: Results, label: str, metric: str, short: bool = False) -> list[list[float]]:
    """Per seed, `metric` at every epoch (a diverged run stops early)."""
    return [[p[metric] for p in r.history] for r in runs(results, label, short)]


def _at(series: list[list[float]], index: int) -> list[float]:
    return [s[index] for s in series if len(s) > index]


def check_early_convergence(results: Results, settings: Settings) -> Verdict:
    bn, eq = (curves(results, label, "test_acc") for label in ("BatchNorm", "EquiNorm"))
    if not bn or not eq:
        return Verdict("-", "inconclusive", "runs missing")
    epochs = max(1, round(EARLY * EPOCHS[settings.quick]))
    ahead = [e for e in range(epochs)
             if median(_at(eq, e)) > median(_at(bn, e))]
    ours = "; ".join(f"epoch {e + 1}: EquiNorm {median_iqr(_at(eq, e), '{:.3f}')} vs BatchNorm "
                     f"{median_iqr(_at(bn, e), '{:.3f}')}" for e in range(epochs))
    why = f"EquiNorm's median test accuracy ahead at {len(ahead)} of the first {epochs} epochs"
    return Verdict(ours, "reproduced" if len(ahead) == epochs else "not reproduced", why)


def _loss_rise(series: list[list[float]], settings: Settings) -> list[float]:
    """Per seed: final test loss minus the lowest test loss after the first lr drop."""
    drop = EPOCHS[settings.quick] // 2
    return [s[-1] - min(s[drop:]) for s in series if len(s) > drop]


def check_overfitting(results: Results, settings: Settings) -> Verdict:
    rises = {label: _loss_rise(curves(results, label, "test_loss"), settings)
             for label in VARIANTS}
    ours = "test-loss rise after the first drop: " + "; ".join(
        f"{label} {median_iqr(r, '{:.3f}')}" for label, r in rises.items())
    medians = {label: median(r) for label, r in rises.items()}
    if any(math.isnan(m) for m in medians.values()):
        return Verdict(ours, "inconclusive", "runs missing or diverged")
    more = medians["EquiNorm"] > medians["BatchNorm"]
    fixed = medians["EquiNorm, first-quarter stats"] < medians["EquiNorm"]
    verdict = "reproduced" if more and fixed else "not reproduced"
    return Verdict(ours, verdict, f"EquiNorm's rise above BatchNorm's: {more}; first-quarter "
                   f"statistics lower it: {fixed}")


def check_short_schedule(results: Results, settings: Settings) -> Verdict:
    acc = {label: [final(r, "test_acc") for r in runs(results, label, short=True)
                   if r.status == "done"] for label in ("BatchNorm", "EquiNorm")}
    ours = "; ".join(f"{label} {median_iqr(a, '{:.3f}')}" for label, a in acc.items())
    if not all(acc.values()):
        return Verdict(ours, "inconclusive", "runs missing or diverged")
    eq, bn = (median(acc[label]) for label in ("EquiNorm", "BatchNorm"))
    return Verdict(ours, "reproduced" if eq > bn else "not reproduced",
                   f"median final accuracy EquiNorm {100 * eq:.1f}% vs BatchNorm "
                   f"{100 * bn:.1f}% (linear decay, no mixup)")


def draw_curves(results: Results, settings: Settings, path) -> None:
    panels = [(title, [(label, curves(results, label, metric)) for label in VARIANTS])
              for title, metric in (("test accuracy", "test_acc"), ("test loss", "test_loss"))]
    band_panels(path, panels, None, "epoch", "accuracy / loss")


def protocol(settings: Settings) -> list[str]:
    model, epochs = MODEL[settings.quick], EPOCHS[settings.quick]
    train_limit, test_limit = LIMITS[settings.quick]
    lines = [
        "Data: CIFAR-10 (JPEG q75 copy from ../shared/data), standardized per channel for "
        "BatchNorm and GroupNorm, raw pixels in [0, 1] for EquiNorm (section 5.2), "
        "random flips and 4-pixel-pad crops at training time"
        + (f"; the first {train_limit} training and {test_limit} test images (quick)."
           if train_limit else "."),
        f"Network: CIFAR ResNet depth {model['depth']}, width {model['width']} (the paper: a "
        f"wide ResNet, 20 convolutions, 96 planes, 9.7M parameters); EquiNorm replaces every "
        f"conv and linear layer (no activation normalizer).",
        f"Long schedule: {epochs} epochs (paper: 300), SGD momentum 0.9, weight decay 1e-4, "
        f"batch 128, lr 0.1 divided by 10 at epochs {epochs // 2} and {3 * epochs // 4}.",
        f"Short schedule (section 6.2, scaled): {max(2, epochs // 10)} epochs, lr 0.1 decayed "
        f"linearly (paper: 30 epochs of a one-cycle schedule with manifold mixup).",
        f"First-quarter statistics: EquiNorm with stat_fraction=0.25. Seeds: {settings.seeds}.",
    ]
    return lines


RECIPE = Recipe(
    name="equinorm",
    title="EquiNorm against BatchNorm and GroupNorm on CIFAR-10 (seed 004)",
    seed_doc="004_ca505090e9f55f6e.txt",
    jobs=jobs,
    claims=[
        Claim("early convergence", "EquiNorm converges faster than BatchNorm in the early "
              "epochs", "'converged significantly faster than BatchNorm' (Figure 2, 4a)",
              check_early_convergence),
        Claim("overfitting", "EquiNorm overfits more (test loss rises after the first lr "
              "drop); first-quarter batch statistics reduce it",
              "Figure 2; with first-quarter statistics 95.8% (EquiNorm) vs 94.7% (BatchNorm), "
              "no rise in test loss", check_overfitting),
        Claim("short schedule", "with a short schedule EquiNorm ends above BatchNorm",
              "30 epochs: 94.0% (IQR 0.22) vs 93.3% (IQR 0.77), median of 10",
              check_short_schedule),
    ],
    figures=[Figure("equinorm_curves.png", "Test accuracy and test loss per epoch, median and "
                    "IQR over seeds (CIFAR-10, JPEG q75 copy).", draw_curves)],
    protocol=protocol,
    seeds=(3, 5),
    dataset="cifar10",
)
