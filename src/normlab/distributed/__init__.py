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

import warnings

from .collectives import (
    HasSyncedForm,
    RankSlice,
    Syncable,
    all_reduce_sum,
    free_port,
    global_batch_norm,
    run_local,
    sync_group,
)
from .convert import GlobalBatchNorm, convert_sync

__all__ = ["GlobalBatchNorm", "HasSyncedForm", "RankSlice", "Syncable", "all_reduce_sum",
           "convert_sync", "free_port", "global_batch_norm", "run_local", "sync_group"]


def __getattr__(name: str):
    if name == "SyncBatchNorm":  # torch's class name, for a different class
        warnings.warn("normlab.distributed.SyncBatchNorm is now GlobalBatchNorm",
                      DeprecationWarning, stacklevel=2)
        return GlobalBatchNorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
