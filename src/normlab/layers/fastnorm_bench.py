"""Bench cases for FastNorm: `fastnorm` (training step, tracking cost) and
`fastnorm_crossover` (the batch size where the tracked update stops paying)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from .. import bench, models
from .fastnorm import FastNormSGD, tracked_sq_norms


def _sgd_step(model: nn.Module, optimizer, batch_size: int):
    x = torch.randn(batch_size, 784)
    y = torch.randint(0, 10, (batch_size,))

    def run():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return run


def _explicit_weight_norm_mlp() -> nn.Module:
    model = models.mlp("none")
    for module in model:
        if isinstance(module, nn.Linear):
            weight_norm(module)
    return model


def _tracking_inputs(in_features: int, out_features: int, batch_size: int):
    weight = torch.randn(out_features, in_features)
    inv_norm = weight.norm(dim=1).reciprocal()
    inputs = torch.randn(batch_size, in_features)
    outputs = inputs @ weight.T * inv_norm
    grads = torch.randn(batch_size, out_features)
    gain = torch.ones(out_features)

    def tracked():
        tracked_sq_norms(inv_norm.pow(-2), inv_norm, gain, inputs, outputs, grads, 0.1, 0.0)

    def explicit():
        torch.linalg.vector_norm(weight, dim=1)
    return tracked, explicit


@bench.case("fastnorm")
def fastnorm_case(min_run_time: float) -> list[bench.Row]:
    """The seed's 784-1024-10 MLP, one SGD step, against plain nn.Linear; then
    the norm update alone (batch 1) against an explicit norm pass, by width."""
    torch.manual_seed(0)
    rows = []
    for batch_size in (1, 16, 128):
        plain = models.mlp("none")
        fast = models.mlp("fastnorm")
        explicit = _explicit_weight_norm_mlp()
        baseline = _sgd_step(plain, torch.optim.SGD(plain.parameters(), lr=0.01), batch_size)
        variant = f"mlp 784-1024-10 step, batch {batch_size}"
        rows.append(bench.compare("fastnorm", variant, "fastnorm",
                                  _sgd_step(fast, FastNormSGD(fast.parameters(), lr=0.01),
                                            batch_size), "linear", baseline, min_run_time))
        rows.append(bench.compare("fastnorm", variant, "weight_norm (torch)",
                                  _sgd_step(explicit, torch.optim.SGD(explicit.parameters(),
                                                                      lr=0.01), batch_size),
                                  "linear", baseline, min_run_time))
    for width in (256, 1024, 4096):
        tracked, explicit_norms = _tracking_inputs(width, width, 1)
        rows.append(bench.compare("fastnorm", f"norm update {width}x{width}, batch 1",
                                  "tracked", tracked, "explicit norms", explicit_norms,
                                  min_run_time))
    return rows


@bench.case("fastnorm_crossover")
def crossover_case(min_run_time: float) -> list[bench.Row]:
    """The tracked update against an explicit norm pass for the 784 -> 1024 layer, by batch."""
    torch.manual_seed(0)
    rows = []
    for batch_size in (1, 8, 16, 32, 64, 128, 256):
        tracked, explicit_norms = _tracking_inputs(784, 1024, batch_size)
        rows.append(bench.compare("fastnorm_crossover", f"784->1024, batch {batch_size}",
                                  "tracked", tracked, "explicit norms", explicit_norms,
                                  min_run_time))
    return rows
