"""The base of the per-channel activation normalizers with running statistics."""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..distributed import Syncable


class ChannelNorm(nn.Module, Syncable):
    """Per-channel affine ``weight``/``bias``, ``running_mean``/``running_var``
    buffers, the input checks and the ``sync``/``process_group`` settings
    shared by Batch Renormalization and Online Normalization. Subclasses set
    `_input_dims`, the input ranks they accept.

    ``weight`` and ``bias`` take `dtype`; the running statistics (and any
    buffer a subclass adds with :meth:`_statistics_buffer`) are kept in at
    least float32, also after ``module.to(torch.bfloat16)``: in bfloat16 a
    momentum of 0.01 moves them by less than their resolution.
    """

    _input_dims: tuple[int, ...]

    def __init__(self, num_features: int, affine: bool, sync: bool = False,
                 process_group=None, device=None, dtype=None):
        super().__init__()
        self._init_sync(sync, process_group)
        checks.positive_int(type(self).__name__, "num_features", num_features)
        self.num_features, self.affine = num_features, affine
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._statistics_buffer("running_mean", device, dtype)
        self._statistics_buffer("running_var", device, dtype)

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
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() not in self._input_dims:
            dims = " or ".join(map(str, self._input_dims))
            raise ValueError(f"{name} expects a {dims}-D input (N, C, ...), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name} expects {self.num_features} channels (dim 1), "
                             f"got shape {tuple(x.shape)}")
        checks.floating_point_input(name, x)
