"""`convert_sync`: a model's layers in their synced form for DDP; `GlobalBatchNorm`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import module_kinds
from .collectives import HasSyncedForm, global_batch_norm, sync_group


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalization with the statistics of the process group's global batch.

    (It was ``normlab.distributed.SyncBatchNorm``, torch's class name for another class.)

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
            raise ValueError(f"GlobalBatchNorm expects an input of at least 2 dims (N, C, ...), "
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
                     process_group: dist.ProcessGroup | None) -> GlobalBatchNorm:
    """`module` as a GlobalBatchNorm sharing its parameters and buffers (as torch's
    convert_sync_batchnorm does, so an optimizer built before keeps working)."""
    synced = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                           module.track_running_stats, process_group)
    if module.affine:
        synced.weight, synced.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(synced, name, getattr(module, name))
    return synced.train(module.training)


def convert_sync(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """`model` with its batch-dependent layers in their synced form, for DDP.

    In the spirit of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`:
    each normlab layer with a synced form (:class:`HasSyncedForm`) switches to
    it over `process_group` (None: the world group): the layers with batch
    statistics get ``sync=True``, FastNorm layers ``mode="dense"``, whose
    weight gradient DDP all-reduces. torch's BatchNorm1d/2d/3d and
    SyncBatchNorm, and their subclasses, become normlab's :class:`GlobalBatchNorm`
    (torch's, but usable on CPU too), sharing their parameters and buffers. A
    subclass that overrides ``forward`` (timm's BatchNormAct2d) becomes a
    GlobalBatchNorm followed by the steps it adds when registered with
    :func:`normlab.register_norm_subclass`, and is refused (ValueError naming it)
    otherwise; one held at its running statistics by `normlab.freeze` stays as it is.
    The model is changed in place and returned (a new object only when
    `model` itself is a BatchNorm); batch-independent layers are left alone.

    Example:
        >>> model = normlab.convert_sync(normlab.models.cifar_resnet(8, norm="batch_renorm"))
        >>> # then, after torch.distributed.init_process_group:
        >>> model = torch.nn.parallel.DistributedDataParallel(model)  # doctest: +SKIP
    """
    if isinstance(model, HasSyncedForm):  # normlab's first: its layers sync themselves
        model.use_synced_form(process_group)
    elif isinstance(model, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(model, GlobalBatchNorm) and not module_kinds.frozen(model):
        if module_kinds.uninitialized(model):
            raise ValueError(f"{type(model).__name__} is a lazy module whose parameters do "
                             f"not exist yet; run one forward pass through the model first")
        base, _ = module_kinds.torch_norm(model)
        steps = module_kinds.extra_steps(model, base, "GlobalBatchNorm")
        synced = _sync_batch_norm(model, process_group)
        return nn.Sequential(synced, *steps) if steps else synced
    for name, child in model.named_children():
        synced = convert_sync(child, process_group)
        if synced is not child:
            setattr(model, name, synced)
    return model
