"""The collectives normlab's synced layers use: all-reduce, rank slices, global batch
statistics; and the base classes by which a layer tells `convert_sync` its synced form."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


class HasSyncedForm:
    """A layer that computes differently under DDP: `convert_sync` calls its
    `use_synced_form`, so that convert_sync itself names no layer."""

    def use_synced_form(self, process_group: dist.ProcessGroup | None) -> None:
        """Switch this layer, in place, to its form for DDP over `process_group`."""
        raise NotImplementedError(f"{type(self).__name__} does not define its synced form")


class Syncable(HasSyncedForm):
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

    def use_synced_form(self, process_group: dist.ProcessGroup | None) -> None:
        self.sync, self.process_group = True, process_group

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
