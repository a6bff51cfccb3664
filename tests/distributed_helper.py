"""Small models trained for a few steps in one process or under DDP, importable by the
spawned workers of test_distributed.py.

Every case trains STEPS SGD steps in float64 on one fixed global batch of GLOBAL_BATCH
samples. Under DDP each rank gets its contiguous slice (`Case.split`) and its loss is its
share of the global batch's mean loss times the group size, which DDP's gradient average
turns back into the global mean's gradient, for even and uneven splits alike.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import normlab

GLOBAL_BATCH, STEPS, CLASSES = 8, 5, 3
# DDP's per-forward buffer broadcast switch; torch 2.13 renamed it.
BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(nn.parallel.DistributedDataParallel).parameters
               else "broadcast_buffers")


@dataclass(frozen=True)
class Case:
    build: object  # () -> nn.Module, called under a fixed seed
    input_shape: tuple  # one sample's
    split: tuple = (4, 4)
    rebalance: bool = False  # run an ENorm cycle after each step
    broadcast_buffers: bool = False  # False: equal buffers must come from the sync itself
    optimizer: type = torch.optim.SGD
    momentum: float = 0.9


def mlp(norm: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), norm or nn.Identity(), nn.ReLU(), nn.Linear(5, 3))


def cnn(norm: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm or nn.Identity(), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def monai_unet() -> nn.Module:
    """MONAI's 3-D U-Net with BatchNorm3d, pooled to CLASSES scores per sample."""
    from monai.networks.nets import UNet

    unet = UNet(spatial_dims=3, in_channels=1, out_channels=CLASSES, channels=(4, 8),
                strides=(2,), num_res_units=1, norm="batch")
    return nn.Sequential(unet, nn.AdaptiveAvgPool3d(1), nn.Flatten())


VECTOR, IMAGE, VOLUME = (6,), (2, 4, 4), (1, 8, 8, 8)
ONLINE = {"alpha_fwd": 0.9, "alpha_bkw": 0.8}  # fast decays: the state matters in 5 steps
RENORM = {"momentum": 0.1, "r_max": 1.2, "d_max": 0.2}  # tight limits: r and d clip

CASES = {
    "batch (SyncBatchNorm)": Case(lambda: mlp(nn.BatchNorm1d(5)), VECTOR),
    "batch 2d (SyncBatchNorm)": Case(lambda: cnn(nn.BatchNorm2d(4)), IMAGE),
    "batch_renorm 1d": Case(lambda: mlp(normlab.BatchRenorm1d(5, **RENORM)), VECTOR),
    "batch_renorm 2d": Case(lambda: cnn(normlab.BatchRenorm2d(4, **RENORM)), IMAGE),
    "batch_renorm uneven 5+3": Case(lambda: mlp(normlab.BatchRenorm1d(5, **RENORM)), VECTOR,
                                    split=(5, 3)),
    "batch_renorm 7+1": Case(lambda: mlp(normlab.BatchRenorm1d(5, **RENORM)), VECTOR,
                             split=(7, 1)),
    "batch (SyncBatchNorm) 8+0": Case(lambda: mlp(nn.BatchNorm1d(5)), VECTOR, split=(8, 0)),
    "online 1d ecm=ac": Case(lambda: mlp(normlab.OnlineNorm1d(5, **ONLINE)), VECTOR),
    "online 2d ecm=ls": Case(lambda: cnn(normlab.OnlineNorm2d(4, ecm="ls", **ONLINE)), IMAGE),
    "online uneven 3+5": Case(lambda: mlp(normlab.OnlineNorm1d(5, **ONLINE)), VECTOR,
                              split=(3, 5)),
    "online, DDP broadcast_buffers": Case(lambda: cnn(normlab.OnlineNorm2d(4, **ONLINE)),
                                          IMAGE, broadcast_buffers=True),
    "equinorm linear stat_fraction=0.75": Case(
        lambda: normlab.convert(mlp(), "equinorm", stat_fraction=0.75), VECTOR),
    "equinorm conv": Case(lambda: normlab.convert(cnn(), "equinorm"), IMAGE),
    "equinorm 0+8": Case(lambda: normlab.convert(mlp(), "equinorm"), VECTOR, split=(0, 8)),
    "equinorm uneven 5+3 stat_fraction=0.75": Case(
        lambda: normlab.convert(mlp(), "equinorm", stat_fraction=0.75), VECTOR, split=(5, 3)),
    "enorm": Case(mlp, VECTOR, rebalance=True),
    "weight_norm": Case(lambda: normlab.convert(cnn(), "weight_norm"), IMAGE),
    "scaled_weight_norm": Case(lambda: normlab.convert(mlp(), "scaled_weight_norm"), VECTOR),
    "normprop": Case(lambda: normlab.convert(cnn(), "normprop"), IMAGE),
    # the dense mode, which convert_sync chooses (its state: s stays 1, unlike the fused mode's)
    "fastnorm linear": Case(lambda: normlab.convert(mlp(), "fastnorm", mode="dense"), VECTOR,
                            optimizer=normlab.FastNormSGD, momentum=0.0),
    "fastnorm conv, momentum": Case(lambda: normlab.convert(cnn(), "fastnorm"), IMAGE,
                                    optimizer=normlab.FastNormSGD),
    "layer": Case(lambda: mlp(nn.LayerNorm(5)), VECTOR),
    "group": Case(lambda: cnn(nn.GroupNorm(2, 4)), IMAGE),
}
if importlib.util.find_spec("monai") is not None:  # test_monai.py fails under CI without it
    CASES["monai UNet 3d, BatchNorm3d (SyncBatchNorm)"] = Case(monai_unet, VOLUME)


def global_batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Positive inputs: EquiNorm's first layer assumes them (harmless for the others).
    inputs = torch.rand((GLOBAL_BATCH, *case.input_shape), generator=generator,
                        dtype=torch.float64) + 0.1
    return inputs, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator)


def train(case: Case, rank: int | None = None) -> dict:
    """STEPS steps; rank None: one process on the global batch, else DDP on its slice.

    Returns the outputs of every step (this process's rows) and the model's
    state_dict (parameters and buffers) after every step.
    """
    torch.manual_seed(0)
    model = case.build().double()
    inputs, labels = global_batch(case)
    world = 1
    if rank is not None:
        world = dist.get_world_size()
        start = sum(case.split[:rank])
        inputs, labels = (t[start:start + case.split[rank]] for t in (inputs, labels))
        model = normlab.convert_sync(model)
    optimizer = case.optimizer(model.parameters(), lr=0.1, momentum=case.momentum)
    rebalancer = normlab.ENorm(model, optimizer, c=1.2) if case.rebalance else None
    trained = model if rank is None else nn.parallel.DistributedDataParallel(
        model, **{BUFFER_SYNC: case.broadcast_buffers})
    outputs, states = [], []
    for _ in range(STEPS):
        out = trained(inputs)
        loss = F.cross_entropy(out, labels, reduction="sum") * world / GLOBAL_BATCH
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rebalancer is not None:
            rebalancer.step()
        outputs.append(out.detach().clone())
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return {"outputs": outputs, "states": states}


def empty_share_error(rank: int) -> str:
    """The error of a synced OnlineNorm1d whose global batch of 2 splits 2 + 0."""
    norm = normlab.OnlineNorm1d(3, sync=True)
    try:
        norm(torch.rand(2 if rank == 0 else 0, 3))
    except ValueError as err:
        return str(err)
    return "no error"


def fused_fastnorm_error() -> str:
    """The error of a step of FastNorm's fused mode under torch.distributed."""
    layer = normlab.FastNormLinear(3, 2)
    layer(torch.rand(2, 3)).sum().backward()
    try:
        normlab.FastNormSGD(layer.parameters(), lr=0.1).step()
    except RuntimeError as err:
        return str(err)
    return "no error"


def worker(rank: int, world_size: int, out_dir: str) -> None:
    """Every case under DDP, in sequence, results saved to OUT_DIR/rank{rank}.pt."""
    results = {name: train(case, rank) for name, case in CASES.items()}
    results["empty share error"] = empty_share_error(rank)
    results["fused fastnorm error"] = fused_fastnorm_error()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
