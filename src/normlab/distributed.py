"""Synced statistics under DistributedDataParallel: `convert_sync` and what the layers share.

Under DDP each process sees 1/P of the global batch. A layer whose output
depends on the batch (Batch Renormalization, EquiNorm, Online Normalization,
BatchNorm) then computes per-process statistics unless it is synced; synced,
it computes them over the global batch, and a model trained on P processes
trains exactly as the same model in one process on the whole batch.

A layer syncs when built with ``sync=True`` (over ``process_group``, the world
group when None, as in :class:`torch.nn.SyncBatchNorm`) or after
`convert_sync`. It syncs only in training and only when torch.distributed is
initialized with more than one process in the group; otherwise, and always
when ``sync=False`` (the default), it computes the statistics of the batch
it is given, with no collective call.

Gradient convention: each rank's loss is its samples' share of the global
batch's mean loss, times P (with an even split, simply the mean over its own
samples); DDP's averaging of the ranks' gradients then gives the global mean
loss's gradient. Online Normalization's control process, whose state is
linear in the gradients, divides them by P so that its state equals the
one-process state.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable


class Syncable:
    """The ``sync`` / ``process_group`` attributes of a layer with batch statistics.

    `sync_group` is the group to compute statistics over in this forward pass,
    or None for the local batch. `convert_sync` sets both attributes.
    """

    sync: bool
    process_group: dist.ProcessGroup | None

    def _init_sync(self, sync: bool, process_group: dist.ProcessGroup | None) -> None:
        if process_group is not None and not sync:
            raise ValueError(f"{type(self).__name__}: a process_group is used only with "
                             f"sync=True; pass sync=True to sync over it")
        self.sync, self.process_group = bool(sync), process_group

    def sync_group(self) -> dist.ProcessGroup | None:
        return sync_group(self.process_group) if self.sync else None

    def _sync_repr(self) -> str:
        return ", sync=True" if self.sync else ""


def sync_group(process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """`process_group` (None: the world group) when torch.distributed is initialized and the
    group has several processes; None when statistics are local anyway."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on the sum, so each input's gradient is the sum of the
        # ranks' output gradients.
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of `tensor` over the group, differentiable: the backward pass sums the ranks'
    gradients, the true gradient of the sum of their losses."""
    return _AllReduceSum.apply(tensor, group)


@dataclass
class RankSlice:
    """This rank's rows [start, stop) of the group's global batch, the ranks' batches
    concatenated in rank order (their sizes may differ)."""

    group: dist.ProcessGroup
    sizes: list[int]
    start: int
    stop: int

    @classmethod
    def of(cls, rows: int, group: dist.ProcessGroup, device: torch.device) -> RankSlice:
        """Gathers every rank's number of rows (one small collective call)."""
        mine = torch.tensor([rows], dtype=torch.long, device=device)
        sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, mine, group=group)
        sizes = [int(size) for size in sizes]
        rank = dist.get_rank(group)
        start = sum(sizes[:rank])
        return cls(group, sizes, start, start + rows)

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """(rows, ...) on each rank -> the (total, ...) global tensor on every rank."""
        largest = max(self.sizes)
        padded = local.contiguous()
        if local.shape[0] < largest:  # all_gather wants equal shapes
            padded = local.new_zeros((largest,) + local.shape[1:])
            padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, self.sizes)])

    def require_rows(self, what: str) -> None:
        """ValueError on every rank alike (no rank left waiting in a collective) when one has
        no rows."""
        if min(self.sizes) == 0:
            raise ValueError(f"{what}, synced, needs at least one sample on every process; the "
                             f"global batch of {self.total} split as {self.sizes}")

    def mine(self, global_tensor: torch.Tensor) -> torch.Tensor:
        return global_tensor[self.start:self.stop]


def global_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None,
                      running_var: torch.Tensor | None, momentum: float, eps: float,
                      group: dist.ProcessGroup
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum,
    eps)`` over the group's global batch: (x^, mean, 1 / sqrt(var + eps)).

    x^ is differentiable, through the all-reduced statistics, as batch
    normalization's gradient is; mean and inverse std come without gradient.
    The running statistics move towards the global mean and unbiased variance.
    The per-channel sums are accumulated in float64, one all-reduce for all.
    """
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.new_full((1,), x.numel() // channels, dtype=torch.float64)
    sums = all_reduce_sum(torch.cat([x.sum(dims, dtype=torch.float64),
                                     (x * x).sum(dims, dtype=torch.float64), count]), group)
    total = sums[-1]
    if total < 2:  # every rank sees the same total: all raise together
        raise ValueError(f"batch normalization in training needs more than 1 value per channel "
                         f"over the global batch, got {int(total)}")
    mean = sums[:channels] / total
    var = (sums[channels:-1] / total - mean * mean).clamp(min=0)
    inv_std = (var + eps).rsqrt()
    view = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - mean.to(x.dtype).view(view)) * inv_std.to(x.dtype).view(view)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            unbiased = var * (total / (total - 1))
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    return x_hat, mean.detach().to(x.dtype), inv_std.detach().to(x.dtype)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalization with the statistics of the process group's global batch.

    :class:`torch.nn.SyncBatchNorm`'s arguments, buffers and state_dict, on any
    device and backend: DDP refuses torch's on CPU (the gloo backend). In
    training with an initialized group of several processes the statistics
    come from `global_batch_norm`; otherwise this is plain batch normalization.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: dist.ProcessGroup | None = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of at least 2 dims (N, C, ...), "
                             f"got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = sync_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as in torch's BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        x_hat, _, _ = global_batch_norm(input, self.running_mean, self.running_var,
                                        momentum or 0.0, self.eps, group)
        if not self.affine:
            return x_hat
        view = (1, -1) + (1,) * (input.dim() - 2)
        return torch.addcmul(self.bias.view(view), x_hat, self.weight.view(view))


def _sync_batch_norm(module: nn.modules.batchnorm._BatchNorm,
                     process_group: dist.ProcessGroup | None) -> SyncBatchNorm:
    """`module` as a SyncBatchNorm sharing its parameters and buffers (as torch's
    convert_sync_batchnorm does, so an optimizer built before keeps working)."""
    synced = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                           module.track_running_stats, process_group)
    if module.affine:
        synced.weight, synced.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(synced, name, getattr(module, name))
    return synced.train(module.training)


def convert_sync(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """`model` with its batch-dependent layers in their synced form, for DDP.

    In the spirit of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`:
    normlab's layers with batch statistics get ``sync=True`` over
    `process_group` (None: the world group), and torch's BatchNorm1d/2d/3d and
    SyncBatchNorm become normlab's :class:`SyncBatchNorm` (torch's, but
    usable on CPU too), sharing their parameters and buffers. The model is
    changed in place and returned (a new object only when `model` itself is
    a BatchNorm); FastNorm layers switch to ``mode="dense"``, whose weight
    gradient DDP all-reduces; batch-independent layers are left alone.

    Example:
        >>> model = normlab.convert_sync(normlab.models.cifar_resnet(8, norm="batch_renorm"))
        >>> # then, after torch.distributed.init_process_group:
        >>> model = torch.nn.parallel.DistributedDataParallel(model)  # doctest: +SKIP
    """
    from .layers.fastnorm import _FastNorm  # here: the layers import this module

    if isinstance(model, Syncable):
        model.sync, model.process_group = True, process_group
    elif isinstance(model, _FastNorm):
        # the fused update reads only this process's samples; the dense
        # gradient is what DDP all-reduces
        model.mode = "dense"
    elif isinstance(model, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(model, SyncBatchNorm):
        return _sync_batch_norm(model, process_group)
    for name, child in model.named_children():
        synced = convert_sync(child, process_group)
        if synced is not child:
            setattr(model, name, synced)
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_local(fn: Callable[..., object], nprocs: int, *args) -> None:
    """Run ``fn(rank, nprocs, *args)`` in `nprocs` new processes on this machine, each in a
    gloo process group on 127.0.0.1 (torch.multiprocessing spawn); for tests and benchmarks."""
    torch.multiprocessing.spawn(_run_in_group, (fn, nprocs, free_port(), args), nprocs=nprocs)


def _run_in_group(rank: int, fn, nprocs: int, port: int, args) -> None:
    torch.set_num_threads(1)  # nprocs processes share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=nprocs)
    try:
        fn(rank, nprocs, *args)
    finally:
        dist.destroy_process_group()
