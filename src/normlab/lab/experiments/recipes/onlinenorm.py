"""Recipe `onlinenorm` (seed 001): memory, batch-size dependence, train/inference symmetry.

(a) The poster's memory table, counted on the meta device (`memory`).
(b) Test accuracy against the batch size for BatchNorm, GroupNorm, Batch
    Renormalization and Online Normalization, on the MNIST MLP and a small
    CIFAR ResNet: the poster's claim that Online Normalization "eliminates
    batch dependency".
(c) Train/inference symmetry: on held-out data, the relative difference
    between a trained network's outputs in training mode (batches of the
    training size) and in evaluation mode.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ... import training
from .. import memory
from ..plots import band_panels
from ..recipe import Claim, Figure, Recipe, Results, Settings, Verdict, grid, median, median_iqr
from ..runner import Probe

NORMS = ("batch", "group", "batch_renorm", "online")
LABELS = {"batch": "BatchNorm", "group": "GroupNorm", "batch_renorm": "Batch Renorm",
          "online": "Online Norm"}
BATCH_DEPENDENT = ("batch", "batch_renorm")
BATCHES = (1, 2, 8, 32, 128)
TASKS = ("mnist-mlp", "cifar10-resnet")
BASE_LR = {"mnist-mlp": 0.1, "cifar10-resnet": 0.1}  # at batch 128, scaled linearly
MODEL_KW = {"mnist-mlp": {}, "cifar10-resnet": {"depth": 8, "width": 8}}
EPOCHS = {False: {"mnist-mlp": 5, "cifar10-resnet": 15}, True: {"mnist-mlp": 1,
                                                               "cifar10-resnet": 1}}
QUICK_LIMITS = {"mnist-mlp": (3_000, 1_000), "cifar10-resnet": (1_000, 1_000)}  # train, test
GAP_SAMPLES = 1_000  # held-out samples for the train/eval gap


def cannot_train(norm: str, task: str, batch: int) -> bool:
    """BatchNorm and Batch Renorm have one value per channel in an MLP at batch 1:
    torch refuses to normalize it (the variance is undefined)."""
    return batch == 1 and task == "mnist-mlp" and norm in BATCH_DEPENDENT


# -- probes ------------------------------------------------------------------

def memory_probe(seed: int) -> list[dict]:
    """(a) One point per network and batch size: our activation GB."""
    return [{"network": i, "batch": batch, "gb": gb}
            for i, row in enumerate(memory.measure())
            for batch, gb in zip(memory.BATCHES, row["ours_gb"])]


@torch.no_grad()
def train_eval_gap(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int) -> dict:
    """Outputs in training mode (batches of `batch_size`, on a copy, so that the model's
    running statistics are untouched) against evaluation mode, on held-out data."""
    evaluated = model.eval()(images)
    streamed = copy.deepcopy(model).train()
    trained = torch.cat([streamed(chunk) for chunk in images.split(batch_size)])
    gap = (trained - evaluated).norm(dim=1) / evaluated.norm(dim=1).clamp_min(1e-12)
    return {"gap": gap.mean().item(),
            "train_mode_acc": (trained.argmax(1) == labels).float().mean().item(),
            "eval_mode_acc": (evaluated.argmax(1) == labels).float().mean().item()}


def train_config(seed: int, task: str, norm: str, batch: int, quick: bool
                 ) -> training.TrainConfig:
    """The training run of `batch_probe`."""
    train_limit, test_limit = QUICK_LIMITS[task] if quick else (None, None)
    return training.TrainConfig(
        task=task, norm=norm, lr=BASE_LR[task] * batch / 128, epochs=EPOCHS[quick][task],
        batch_size=batch, seed=seed, momentum=0.9 if task == "cifar10-resnet" else 0.0,
        weight_decay=5e-4 if task == "cifar10-resnet" else 0.0, lr_schedule="linear",
        train_limit=train_limit, test_limit=test_limit, model_kw=MODEL_KW[task])


def batch_probe(seed: int, task: str, norm: str, batch: int, quick: bool,
                data_dir=None) -> list[dict]:
    """(b) and (c): train `task` with `norm` at `batch`, then measure the gap."""
    config = train_config(seed, task, norm, batch, quick)
    result = training.train(config, data_dir=data_dir)
    if result.status != "done":
        return [{"diverged": 1.0}]
    images, labels = training.load_split(config, "test", data_dir)
    gap = train_eval_gap(result.model, images[-GAP_SAMPLES:], labels[-GAP_SAMPLES:], batch)
    return [{**result.final, **gap}]


def jobs(settings: Settings) -> list[Probe]:
    points = grid(task=TASKS, norm=NORMS, batch=BATCHES, quick=(settings.quick,),
                  seed=range(settings.seeds))
    return [Probe(memory_probe)] + [
        Probe(batch_probe, point.pop("seed"), point, uses_data=True) for point in points
        if not cannot_train(point["norm"], point["task"], point["batch"])]


# -- claims ------------------------------------------------------------------

def metric(results: Results, task: str, norm: str, batch: int, name: str) -> list[float]:
    """Per seed; a diverged run counts as NaN."""
    return [r.history[-1].get(name, math.nan)
            for r in results.select(probe=batch_probe, task=task, norm=norm, batch=batch)
            if r.history]


def check_memory(results: Results, settings: Settings) -> Verdict:
    runs = results.select(probe=memory_probe)
    points = runs[0].history if runs else []
    if not points:
        return Verdict("-", "inconclusive", "memory probe missing")
    gb = {(p["network"], p["batch"]): p["gb"] for p in points}
    ratios = [gb[i, 32] / gb[i, 1] for i in range(len(memory.NETWORKS))]
    ours = "; ".join(f"{net.name}: {gb[i, 1]:.1f} / {gb[i, 32]:.1f} / {gb[i, 128]:.1f} GB"
                     for i, net in enumerate(memory.NETWORKS))
    poster = [net.poster_gb[1] / net.poster_gb[0] for net in memory.NETWORKS]
    within = [i for i, net in enumerate(memory.NETWORKS)
              if all(abs(math.log(o / p)) <= math.log(2)
                     for o, p in zip((gb[i, b] for b in memory.BATCHES), net.poster_gb))]
    why = (f"batch 1 needs {min(ratios):.0f}-{max(ratios):.0f}x less than batch 32 (poster: "
           f"{min(poster):.0f}-{max(poster):.0f}x); our GB within 2x of the poster's for "
           f"{len(within)} of {len(ratios)} networks (its U-Net widths and precision are "
           f"not stated)")
    return Verdict(ours, "reproduced" if min(ratios) > 25 else "not reproduced", why)


def _common_batches(task: str, settings: Settings) -> list[int]:
    """The batch sizes every method trains at on `task` (a fair range comparison)."""
    return [b for b in BATCHES if not any(cannot_train(n, task, b) for n in NORMS)]


def _spread(results: Results, task: str, norm: str, settings: Settings) -> float:
    """Max minus min over the common batch sizes of the median test accuracy."""
    medians = [median(metric(results, task, norm, b, "test_acc"))
               for b in _common_batches(task, settings)]
    return max(medians) - min(medians) if medians else math.nan


def check_batch_dependency(results: Results, settings: Settings) -> Verdict:
    spreads = {(t, n): _spread(results, t, n, settings) for t in TASKS for n in NORMS}
    ours = "; ".join(f"{t} (batches {_common_batches(t, settings)}): " + ", ".join(
        f"{LABELS[n]} {100 * spreads[t, n]:.1f}" for n in NORMS) for t in TASKS)
    ours = "range of median test accuracy over batch sizes (points): " + ours
    if any(math.isnan(v) for v in spreads.values()):
        return Verdict(ours, "inconclusive", "runs missing or diverged")
    holds = [t for t in TASKS if all(spreads[t, "online"] < spreads[t, n]
                                     for n in BATCH_DEPENDENT)]
    why = (f"Online Norm varies less with the batch size than BatchNorm and Batch Renorm on "
           f"{len(holds)} of {len(TASKS)} tasks ({', '.join(holds) or 'none'}); besides, the "
           f"two cannot train the MLP at batch 1 at all")
    return Verdict(ours, "reproduced" if len(holds) == len(TASKS) else "not reproduced", why)


def check_symmetry(results: Results, settings: Settings) -> Verdict:
    small = BATCHES[1]  # the smallest batch BatchNorm trains at on both tasks
    gaps = {(t, n): metric(results, t, n, small, "gap") for t in TASKS for n in NORMS}
    ours = f"relative train/eval output gap at batch {small}: " + "; ".join(
        f"{t}: " + ", ".join(f"{LABELS[n]} {median_iqr(gaps[t, n], '{:.2g}')}" for n in NORMS)
        for t in TASKS)
    medians = {k: median(v) for k, v in gaps.items()}
    if any(math.isnan(v) for v in medians.values()):
        return Verdict(ours, "inconclusive", "runs missing or diverged")
    holds = [t for t in TASKS if all(medians[t, "online"] < medians[t, n]
                                     for n in BATCH_DEPENDENT)]
    why = (f"Online Norm's gap below BatchNorm's and Batch Renorm's on {len(holds)} of "
           f"{len(TASKS)} tasks")
    return Verdict(ours, "reproduced" if len(holds) == len(TASKS) else "not reproduced", why)


# -- figures -----------------------------------------------------------------

def _lines(results: Results, settings: Settings, task: str, name: str, scale: float):
    lines = []
    for norm in NORMS:
        per_batch = [metric(results, task, norm, b, name) if not cannot_train(norm, task, b)
                     else [] for b in BATCHES]
        seeds = max(map(len, per_batch))
        lines.append((LABELS[norm], [[scale * v[s] if s < len(v) else math.nan
                                      for v in per_batch] for s in range(seeds)]))
    return lines


def draw_batch_dependency(results: Results, settings: Settings, path) -> None:
    band_panels(path, [(f"{task} (no point: cannot train)",
                        _lines(results, settings, task, "test_acc", 100)) for task in TASKS],
                BATCHES, "batch size", "test accuracy (%)", logx=True)


def draw_symmetry(results: Results, settings: Settings, path) -> None:
    band_panels(path, [(task, _lines(results, settings, task, "gap", 1)) for task in TASKS],
                BATCHES, "batch size",
                "||f_train(x) - f_eval(x)|| / ||f_eval(x)||", logx=True, logy=True)


def protocol(settings: Settings) -> list[str]:
    lines = [
        "(a) " + memory.assumptions() + " Networks: ResNet-50 (He et al. 2016); 2D U-Net "
        "(Ronneberger et al. 2015, 64-1024 channels, padded convolutions); 3D U-Net "
        "(Cicek et al. 2016, 32/64-256/512 channels, padded); BatchNorm after every conv.",
        f"(b) Batch sizes {BATCHES}; MNIST MLP 784-1024-10 (SGD) and CIFAR-10 (JPEG q75 copy "
        f"from ../shared/data) ResNet-8 width 8 with flips and crops (SGD, momentum 0.9, "
        f"weight decay 5e-4); learning rate 0.1 x batch / 128 (linear scaling), decayed "
        f"linearly to 0; epochs {EPOCHS[settings.quick]}. BatchNorm and Batch Renorm are not "
        f"run on the MLP at batch 1 (one value per channel: torch refuses).",
        f"(c) On the last {GAP_SAMPLES} held-out test samples: mean over samples of "
        f"||f_train(x) - f_eval(x)|| / ||f_eval(x)|| on the logits, training mode on a copy "
        f"of the trained network fed batches of the training size.",
        f"Seeds: {settings.seeds} per configuration; medians and IQRs over them.",
    ]
    if settings.quick:
        lines.append(f"Quick mode: one epoch on the first "
                     f"{QUICK_LIMITS['mnist-mlp'][0]} MNIST / {QUICK_LIMITS['cifar10-resnet'][0]}"
                     f" CIFAR-10 training images, accuracy on the first "
                     f"{QUICK_LIMITS['mnist-mlp'][1]} / {QUICK_LIMITS['cifar10-resnet'][1]} "
                     f"test images.")
    return lines


RECIPE = Recipe(
    name="onlinenorm",
    title="Online Normalization: memory, batch size, train/inference symmetry (seed 001)",
    seed_doc="001_3da1fb90aa669dd2.txt",
    jobs=jobs,
    claims=[
        Claim("memory", "training at batch 1 with Online Normalization needs a fraction of "
              "BatchNorm's activation memory at batches 32 and 128",
              "GB, Online b=1 / BN b=32 / BN b=128: ResNet-50 1/2/4; 3D U-Net 150^3 1/29/115, "
              "250^3 6/195/785; 2D U-Net 1024^2 2/31/123, 2048^2 5/137/546 (theory)",
              check_memory),
        Claim("batch dependency", "Online Normalization removes the dependency of accuracy "
              "on the batch size", "'eliminates batch dependency' (no figure in the poster)",
              check_batch_dependency),
        Claim("train/inference symmetry", "the network computes the same function in "
              "training and in inference", "'provides train/inference symmetry' (no figure)",
              check_symmetry),
    ],
    figures=[
        Figure("onlinenorm_batch.png", "Test accuracy against the batch size, median and IQR "
               "over seeds (MNIST; CIFAR-10, JPEG q75 copy).", draw_batch_dependency),
        Figure("onlinenorm_symmetry.png", "Train/eval output gap on held-out data against the "
               "batch size, median and IQR over seeds.", draw_symmetry),
    ],
    protocol=protocol,
    seeds=(1, 3),
    dataset="mnist",
)
