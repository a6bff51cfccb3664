"""The base of the per-channel activation normalizers with running statistics."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import Syncable


class ChannelNorm(nn.Module, Syncable):
    """Per-channel affine ``weight``/``bias``, ``running_mean``/``running_var``
    buffers, the input checks and the ``sync``/``process_group`` settings
    shared by Batch Renormalization and Online Normalization. Subclasses set
    `_input_dims`, the input ranks they accept."""

    _input_dims: tuple[int, ...]

    def __init__(self, num_features: int, affine: bool, sync: bool = False,
                 process_group=None):
        super().__init__()
        self._init_sync(sync, process_group)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features, self.affine = num_features, affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

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
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a floating-point input, got {x.dtype}")
