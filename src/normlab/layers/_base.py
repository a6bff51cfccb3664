"""What normlab's layers share, and what each answers for the tools that act on models.

A layer answers for itself what `fold`, `convert`, `convert_sync` and the registry
ask (those hold no list of layer types):

* a weight normalizer (:class:`WeightNormalizedLayer`) names the torch layer it
  replaces (`plain_type`), builds itself from one (`from_module`, which says whether
  it keeps that layer's function) and turns back into one (`to_plain`);
* an activation normalizer (:class:`ActivationNorm`) says which inputs it takes
  (`dim`: 1 for (N, C[, L]), 2 for (N, C, H, W), 3 for (N, C, D, H, W)) and its evaluation-mode
  per-channel affine form, if it has one (`eval_affine_form`), which fold merges
  into the layer before it;
* a layer that computes differently under DDP derives from
  :class:`normlab.distributed.HasSyncedForm`.

:class:`ChannelNorm` is the skeleton of the per-channel normalizers with running
statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import checks
from ..distributed import Syncable
from ..module_kinds import forward_owner


class WeightNormalizedLayer:
    """A drop-in replacement for a torch Linear/ConvNd that normalizes its weights."""

    plain_type: ClassVar[type[nn.Module]]  # the torch layer it replaces and folds back into
    # keywords for the first weight layer of a model, which sees data, not activations
    first_layer_kw: ClassVar[dict[str, object]] = {}
    # whether `to_plain` needs the input's spatial size (fold records it on an example)
    plain_form_needs_input_size: ClassVar[bool] = False
    # whether `from_module` computes the module's function; False where the method cannot
    # represent every kernel (EquiNorm, Weight Standardization: each kernel's mean is fixed)
    from_module_keeps_function: ClassVar[bool] = True

    @classmethod
    def from_module(cls, module: nn.Module, **kw) -> nn.Module:
        """A layer built from `module`, a `plain_type`: computing the same function where
        `from_module_keeps_function`, else as the class documents."""
        raise NotImplementedError(f"{cls.__name__} does not define from_module")

    @classmethod
    def check_source(cls, module: nn.Module) -> None:
        """A TypeError unless `module` is a `plain_type` that computes as one (a subclass that
        overrides ``forward`` may compute something else): what `from_module` takes."""
        plain = cls.plain_type
        if not isinstance(module, plain):
            raise TypeError(f"{cls.__name__}.from_module expects an nn.{plain.__name__}, "
                            f"got {type(module).__name__}")
        if forward_owner(type(module)) is not forward_owner(plain):
            raise TypeError(f"{cls.__name__}.from_module expects an nn.{plain.__name__}, "
                            f"got {type(module).__name__}, a subclass that overrides its "
                            f"forward")

    def to_plain(self, input_size: tuple[int, ...] | None = None) -> nn.Module:
        """The `plain_type` layer computing this layer's evaluation-mode function."""
        raise NotImplementedError(f"{type(self).__name__} does not define to_plain")


@dataclass
class AffineForm:
    """An evaluation-mode normalizer as ``after(x * scale + shift)``, per channel (dim 1);
    `after` is None or an elementwise module that stays in the model."""

    scale: torch.Tensor
    shift: torch.Tensor
    after: nn.Module | None = None


def running_stats_affine(norm: nn.Module) -> AffineForm | None:
    """The evaluation-mode form of a normalizer with torch BatchNorm's contract
    (``running_mean``, ``running_var``, ``eps``, optional ``weight``/``bias``), in float64;
    None when it keeps no running statistics."""
    if norm.running_mean is None:
        return None
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    shift = -norm.running_mean.double() * scale
    if norm.weight is not None:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
        shift = shift + norm.bias.double()
    return AffineForm(scale, shift)


class ActivationNorm:
    """A normalizer of a layer's output, built by `normlab.create`."""

    dim: ClassVar[int]  # 1: (N, C) or (N, C, L) inputs; 2: (N, C, H, W); 3: (N, C, D, H, W)
    # what each statistic it normalizes with in training spans, for a channel: "batch" (the
    # batch's positions), "positions" (one sample's positions), or None (running statistics
    # only, or no statistic)
    statistics_over: ClassVar[str | None] = None

    def eval_affine_form(self) -> AffineForm | None:
        """This normalizer's evaluation-mode function as a per-channel affine map, or None
        when it is not one."""
        return None


class ChannelNorm(nn.Module, ActivationNorm, Syncable):
    """Per-channel affine ``weight``/``bias``, ``running_mean``/``running_var``
    buffers, the input checks and the ``sync``/``process_group`` settings
    shared by Batch Renormalization and Online Normalization. Subclasses set
    `_input_dims`, the input ranks they accept.

    ``weight`` and ``bias`` take `dtype`; the running statistics (and any
    buffer a subclass adds with :meth:`_statistics_buffer`) are kept in at
    least float32, also after ``module.to(torch.bfloat16)``: in bfloat16 a
    momentum of 0.01 moves them by less than their resolution. Without
    `track_running_stats` the two running buffers are None.
    """

    _input_dims: tuple[int, ...]

    def __init__(self, num_features: int, affine: bool, sync: bool = False,
                 process_group=None, device=None, dtype=None, track_running_stats: bool = True):
        # nn.Module's, not super()'s: a subclass that also derives from torch's _BatchNorm (to
        # be recognized as one) gets here what _BatchNorm.__init__ would build
        nn.Module.__init__(self)
        self._init_sync(sync, process_group)
        checks.positive_int(type(self).__name__, "num_features", num_features)
        self.num_features, self.affine = num_features, affine
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self._statistics_buffer("running_mean", device, dtype)
            self._statistics_buffer("running_var", device, dtype)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def _statistics_buffer(self, name: str, device, dtype) -> None:
        """An uninitialized (num_features,) buffer in at least float32 (set by reset_parameters)."""
        dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        self.register_buffer(name, torch.empty(self.num_features, device=device, dtype=dtype))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype.itemsize < 4:
                self._buffers[name] = buffer.float()
        return self

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def eval_affine_form(self) -> AffineForm | None:
        return running_stats_affine(self)

    def _check_input(self, x: torch.Tensor) -> None:
        check_channels_input(type(self).__name__, x, self._input_dims, self.num_features)


def check_channels_input(name: str, x: torch.Tensor, input_dims: tuple[int, ...],
                         num_features: int) -> None:
    """A clear error unless `x` is a floating-point (N, C, ...) tensor of one of the ranks
    `input_dims`, with `num_features` channels; `name`: the layer's."""
    if x.dim() not in input_dims:
        dims = " or ".join(map(str, input_dims))
        raise ValueError(f"{name} expects a {dims}-D input (N, C, ...), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != num_features:
        raise ValueError(f"{name} expects {num_features} channels (dim 1), "
                         f"got shape {tuple(x.shape)}")
    checks.floating_point_input(name, x)
