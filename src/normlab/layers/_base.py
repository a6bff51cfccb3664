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
from torch.nn import functional as F
from torch.nn.modules.utils import _ntuple
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm as _WeightNormParametrization
from torch.nn.utils.weight_norm import WeightNorm as _WeightNormHook

from .. import checks
from ..distributed import Syncable
from ..module_kinds import forward_owner


@dataclass(frozen=True)
class SourceWeight:
    """What `from_module` reads of a torch layer: its weight and bias as the layer computes
    them and, where torch weight-normalizes it with one length per output unit (``dim=0``),
    the direction v and the lengths g (shape (out,)) that weight is made of."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    direction: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


def read_source(cls: type, module: nn.Module) -> SourceWeight:
    """`module`'s weight for `cls.from_module`: a TypeError unless `module` is a
    `cls.plain_type` (`check_source`), plain or parametrized
    (``torch.nn.utils.parametrizations.weight_norm`` or any other parametrization: its
    computed weight is read) or with the old ``torch.nn.utils.weight_norm`` hook (whose
    ``module.weight`` is refreshed only by a forward, so the weight is computed here from
    weight_g and weight_v)."""
    cls.check_source(module)
    with torch.no_grad():
        hooks = [hook for hook in module._forward_pre_hooks.values()
                 if isinstance(hook, _WeightNormHook) and hook.name == "weight"]
        if hooks:
            weight = hooks[0].compute_weight(module)
            direction, lengths = module.weight_v, module.weight_g
        elif (parametrize.is_parametrized(module, "weight")
              and len(module.parametrizations.weight) == 1
              and isinstance(module.parametrizations.weight[0], _WeightNormParametrization)):
            parametrization = module.parametrizations.weight
            weight = module.weight
            direction, lengths = parametrization.original1, parametrization.original0
        else:
            return SourceWeight(module.weight.detach(), _detached(module.bias))
        if lengths.shape != (len(direction),) + (1,) * (direction.dim() - 1):
            # torch's dim other than 0: lengths per input column or kernel position, or one
            # for the whole tensor; only the weight they make is kept
            return SourceWeight(weight.detach(), _detached(module.bias))
        return SourceWeight(weight.detach(), _detached(module.bias), direction.detach(),
                            lengths.detach().flatten())


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def plain_args(layer: nn.Module) -> dict:
    """The constructor arguments of the torch Linear/ConvNd with `layer`'s geometry, bias,
    device and dtype; `layer`: that torch layer or a normlab one with the same attributes."""
    factory = dict(bias=layer.bias is not None, device=layer.weight.device,
                   dtype=layer.weight.dtype)
    if hasattr(layer, "in_features"):
        return dict(in_features=layer.in_features, out_features=layer.out_features, **factory)
    return dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode,
                **factory)


class WeightNormalizedLayer:
    """A drop-in replacement for a torch Linear/ConvNd that normalizes its weights.

    A subclass takes the constructor arguments of its `plain_type` (and keywords of its
    own) and defines `_load_source` (how it takes a torch layer's weight) and `to_plain`.
    """

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
        """A layer built from `module`, a `plain_type` (plain, or weight-normalized by torch:
        :func:`read_source`), with its geometry, device, dtype and training mode: computing
        the same function where `from_module_keeps_function`, else as the class documents.
        Keywords go to the constructor."""
        source = read_source(cls, module)
        layer = cls(**{**plain_args(module), **kw})
        with torch.no_grad():
            layer._load_source(source)
        return layer.train(module.training)

    def _load_source(self, source: SourceWeight) -> None:
        """Take the torch layer's weight and bias (under no_grad)."""
        raise NotImplementedError(f"{type(self).__name__} does not define _load_source")

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

    @torch.no_grad()
    def _plain_with(self, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """The `plain_type` layer with this layer's geometry and `kernel` and `bias`."""
        plain = self.plain_type(**{**plain_args(self), "bias": bias is not None})
        plain.weight.copy_(kernel)
        if bias is not None:
            plain.bias.copy_(bias)
        return plain.train(self.training)


# the positions of an input, as the messages name them, by the number of spatial dims
SPATIAL_NAMES = {1: "L", 2: "H, W", 3: "D, H, W"}
_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class ConvGeometry:
    """What a weight-normalized Conv1d, Conv2d or Conv3d shares: its dimension is that of
    its `plain_type`; it has the torch convolution's attributes (in_channels, ...,
    padding_mode), from torch's class or from `_init_geometry`."""

    plain_type: ClassVar[type[nn.Module]]

    @classmethod
    def spatial_dims(cls) -> int:
        return _SPATIAL_DIMS[cls.plain_type]

    def _init_geometry(self, in_channels: int, out_channels: int, kernel_size, stride, padding,
                       dilation, groups: int, padding_mode: str,
                       padding_modes: tuple[str, ...] = PADDING_MODES) -> tuple[int, ...]:
        """Check and set the geometry; returns the weight's shape."""
        owner, tuple_of = type(self).__name__, _ntuple(self.spatial_dims())
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            checks.positive_int(owner, name, value)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{owner}: groups must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels}); got groups={groups}")
        if isinstance(padding, str):
            raise ValueError(f"{owner}: padding must be an int or a tuple of "
                             f"{self.spatial_dims()} ints, got {padding!r}")
        checks.one_of(owner, "padding_mode", padding_mode, padding_modes)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple_of(kernel_size), tuple_of(stride)
        self.padding, self.dilation = tuple_of(padding), tuple_of(dilation)
        self.padding_mode = padding_mode
        return (out_channels, in_channels // groups, *self.kernel_size)

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, padding_mode={self.padding_mode!r}")

    def _check_conv_input(self, x: torch.Tensor, unbatched_too: bool = False) -> None:
        """A clear error unless `x` is a floating-point (N, C_in, *positions) tensor (or
        (C_in, *positions) where `unbatched_too`)."""
        name, channels, dims = type(self).__name__, self.in_channels, self.spatial_dims()
        ranks = (dims + 2, dims + 1) if unbatched_too else (dims + 2,)
        if x.dim() not in ranks or x.shape[-dims - 1] != channels:
            positions = SPATIAL_NAMES[dims]
            shape = f"(N, {channels}, {positions})" + (
                f" or ({channels}, {positions})" if unbatched_too else "")
            raise ValueError(f"{name}: expected input of shape {shape}, got {tuple(x.shape)}")
        checks.floating_point_input(name, x)

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(x, padding) for a convolution with zero padding `padding`: as torch's ConvNd, a
        padding mode other than zeros pads `x` explicitly (and the padding left is 0)."""
        if self.padding_mode == "zeros":
            return x, self.padding
        pad = [p for p in reversed(self.padding) for _ in range(2)]
        return F.pad(x, pad, mode=self.padding_mode), (0,) * len(self.padding)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """The torch convolution of this geometry with `weight` and `bias`."""
        x, padding = self._padded(x)
        return _CONVOLUTIONS[self.spatial_dims()](x, weight, bias, self.stride, padding,
                                                 self.dilation, self.groups)


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
    # activation modules that, called on this normalizer's output alone, `convert` replaces
    # by nn.Identity: FRN's TLU takes the place of the ReLU after the normalizer it replaces
    absorbs_following: ClassVar[tuple[type, ...]] = ()

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
