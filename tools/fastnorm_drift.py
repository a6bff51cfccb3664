"""Measure how far FastNorm's tracked row norms drift from the explicit ones.

Trains the seed's 784-1024-10 MLP with FastNormSGD and no renormalization,
with the weights in each dtype, and prints max_i |tracked_i / explicit_i - 1|
(explicit norms computed in float64) over both layers every --every steps. The
numbers chose DEFAULT_RENORM_EVERY in normlab/layers/fastnorm.py.

    PYTHONPATH=src python tools/fastnorm_drift.py [--steps 1000] [--batch-size 16]
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

import normlab
from normlab import FastNormLinear, FastNormSGD, models


def relative_drift(model) -> float:
    return max((layer.tracked_norms().double()
                / (layer.row_scale.double() * layer.weight.double().norm(dim=1)) - 1)
               .abs().max().item() for layer in model.modules()
               if isinstance(layer, FastNormLinear))


def measure(dtype: torch.dtype, images, labels, steps: int, batch_size: int, lr: float,
            every: int) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    model = models.mlp("fastnorm", renorm_every=None).to(dtype)
    optimizer = FastNormSGD(model.parameters(), lr=lr)
    drift = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(labels), (batch_size,))
        loss = F.cross_entropy(model(images[index].to(dtype)).float(), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            drift.append((step, relative_drift(model)))
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--every", type=int, default=250, help="steps between measurements")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    try:
        images, labels = normlab.data.load("mnist", "train", root=args.data_dir,
                                           normalize=True, download=False)
    except (OSError, RuntimeError, ValueError):
        print("no MNIST found: using Gaussian inputs and random labels")
        images, labels = torch.randn(60000, 784), torch.randint(0, 10, (60000,))
    images = images.flatten(1)
    for dtype in (torch.float32, torch.bfloat16):
        for step, drift in measure(dtype, images, labels, args.steps, args.batch_size,
                                   args.lr, args.every):
            print(f"{str(dtype):15s} step {step:5d}  max |tracked/explicit - 1| = {drift:.3e}")


if __name__ == "__main__":
    main()
