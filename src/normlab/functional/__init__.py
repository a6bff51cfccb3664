"""The normalizers' math as functions of tensors: the module <-> functional split of torch.nn.

Each module in :mod:`normlab.layers` checks its arguments, owns its
parameters and buffers, and calls one function here, as torch.nn.BatchNorm2d
calls torch.nn.functional.batch_norm:

* :func:`weight_norm_linear` (norms taken, and differentiated, here),
  :func:`row_scaled_linear`, :func:`row_scaled_conv` (rows scaled by norms
  given) and :func:`row_norms`: weight normalization (WeightNorm, scaled
  WeightNorm, NormProp, FastNorm).
* :func:`recorded_linear`, :func:`with_logical_gradient` (forward), then
  :func:`step_coefficients`, :func:`fused_sgd_step` (with :func:`tracked_sq_norms`) or
  :func:`logical_weight_gradient` (step): FastNorm, whose SGD step is a rank-B update
  with the row norms tracked from the batch.
* :func:`batch_renorm`: Batch Renormalization.
* :func:`online_norm`: Online Normalization, forward and its control-process
  backward.
* :func:`equi_norm`: the effective kernel of Equilibrium Normalization.

Online Normalization updates the running statistics passed in place, as
torch.nn.functional.batch_norm does; batch_renorm returns the updated ones
(its docstring says why). Helpers built on torch's private kernels
live in :mod:`normlab.functional.aten_helpers`.

One file per family; this package re-exports their public functions.
"""

from __future__ import annotations

import warnings

from .batch_renorm import batch_renorm
from .equinorm import equi_norm, equilibrium_shift_scale, unit_row_shift_scale
from .fastnorm import (
    fused_sgd_step,
    logical_weight_gradient,
    recorded_linear,
    step_coefficients,
    tracked_sq_norms,
    with_logical_gradient,
)
from .online_norm import ONLINE_NORM_ECMS, OnlineNormFunction, linear_scan, online_norm
from .weight_norm import row_norms, row_scaled_conv, row_scaled_linear, weight_norm_linear

__all__ = ["ONLINE_NORM_ECMS", "OnlineNormFunction", "batch_renorm", "equi_norm",
           "equilibrium_shift_scale", "fused_sgd_step", "linear_scan", "logical_weight_gradient",
           "online_norm", "recorded_linear", "row_norms", "row_scaled_conv", "row_scaled_linear",
           "step_coefficients", "tracked_sq_norms", "unit_row_shift_scale",
           "weight_norm_linear", "with_logical_gradient"]

# old name -> new name: weight_normalized_linear was easily taken for weight_norm_linear
_RENAMED = {"weight_normalized_linear": "row_scaled_linear",
            "weight_normalized_conv2d": "row_scaled_conv",
            "row_scaled_conv2d": "row_scaled_conv"}  # it serves Conv1d/2d/3d


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(f"normlab.functional.{name} is now {_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
