"""torch's batch-norm and clamp kernels, borrowed for other reductions: the one place;
and `autocast_off`, which the functions around them run under.

Online Normalization and Batch Renormalization need per-row scales, two fused
sums per row, sums over the batch, a clamp's gradient, batch statistics and batch normalization's
backward with given statistics. torch's batch-norm
kernels compute exactly these in one vectorized pass each, several times
faster on CPU than the broadcasting expressions; some of them are reached
only through undocumented aten ops (``native_batch_norm``,
``native_batch_norm_backward``, ``batch_norm_update_stats``,
``hardtanh_backward``). Each helper states
the plain-torch expression it equals; ``tests/test_kernels.py`` compares
them, so a torch release that changes one of these ops fails there, loudly.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from .._ext import loader as _native


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x * scale[..., None] + shift[..., None] for (N, C, S) x and (N, C) scale and shift.

    Runs on the batch-norm inference kernel (mean 0, variance 1, eps 0), with
    each (sample, channel) row as one channel. Written into `out` if given,
    which may be x itself: the kernel reads and writes each element at the
    same index.
    """
    rows = x.shape[0] * x.shape[1]
    zeros = x.new_zeros(rows)
    x_rows = x.reshape(1, rows, -1)
    scale, shift = scale.reshape(rows).to(x.dtype), shift.reshape(rows).to(x.dtype)
    if out is None:
        return F.batch_norm(x_rows, zeros, zeros + 1, scale, shift, training=False,
                            momentum=0.0, eps=0.0).view_as(x)
    torch.ops.aten.native_batch_norm.out(x_rows, scale, shift, zeros, zeros + 1, False, 0.0, 0.0,
                                         out=out.view(1, rows, -1), save_mean=x.new_empty(0),
                                         save_invstd=x.new_empty(0))
    return out


def row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((a * b).sum(-1), a.sum(-1)) for (N, C, S) tensors, each of shape (N, C).

    One fused pass over both tensors, on the batch-norm backward kernel (mean
    0, inverse std 1), whose weight and bias gradients are these two sums.
    """
    rows = a.shape[0] * a.shape[1]
    zeros = a.new_zeros(rows)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        a.reshape(1, rows, -1), b.reshape(1, rows, -1), None, None, None, zeros, zeros + 1,
        True, 0.0, [False, True, True])
    return dot.view(a.shape[:2]), total.view(a.shape[:2])


def column_sums(a: torch.Tensor) -> torch.Tensor:
    """a.sum(0) for a 2-d tensor, as a matrix-vector product.

    torch's reduction over a dim, once it runs on more than one thread (from
    32768 elements), took about 8 ms per call on the 2-thread benchmark machine
    whatever the size (a (128, 256) float64 tensor: 8 ms; this: 8 us), more
    than the whole BatchNorm step it is compared with. Not autocast (mv is not
    on autocast's lists): the sums stay in a's dtype.
    """
    return torch.mv(a.T, a.new_ones(a.shape[0]))


def clamp_backward(grad: torch.Tensor, x: torch.Tensor, limit: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of x.clamp(-limit, limit): grad where -limit < x < limit, else 0.

    aten's hardtanh backward, one pass; the gradient is 0 at the limits
    themselves. Written into `out` if given, which may be grad or x.
    """
    if out is None:
        return torch.ops.aten.hardtanh_backward(grad, x, -limit, limit)
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, -limit, limit, grad_input=out)


def batch_statistics(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of (N, C, *) x over all dims but 1, no gradient.

    On CPU (float32, float64) the compiled channel moments (csrc/activations.cpp, two
    passes); elsewhere torch's ``batch_norm_update_stats`` (one pass). The running
    statistics are updated in place as BatchNorm does:
    running <- (1 - momentum) running + momentum batch, the variance unbiased.
    """
    if x.device.type == "meta":  # the op has no meta kernel; meta tensors carry only shapes
        return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])
    kernel = _native.for_tensor("activations", x, openmp=True)
    if kernel is None:
        # torch has no derivative for this op: the statistics are constants here.
        return torch.batch_norm_update_stats(x.detach(), running_mean, running_var, momentum)
    # on CPU the op (Welford's update per element) takes ~4x a pass over x: two passes
    channels = x.shape[1]
    mean, var = kernel.channel_moments(x.detach())
    count = x.numel() // channels
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, var * count / (count - 1))):
            running.mul_(1 - momentum).add_(batch.to(running.dtype), alpha=momentum)
    return mean.to(x.dtype), var.to(x.dtype)


def batch_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, inv_std: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of y = weight * x_hat + bias, x_hat = (x - mean) * inv_std with mean and
    inv_std x's batch statistics (as `batch_statistics` gives): (grad_x, grad_weight, grad_bias).

    grad_x is batch normalization's (through the batch statistics), grad_weight
    = sum(grad * x_hat) and grad_bias = sum(grad) over all dims but 1; a
    reduction pass and an elementwise pass, as BatchNorm's backward. A channels_last x
    on CPU (float32, float64) goes to the compiled channel_batch_norm_backward
    (csrc/activations.cpp), the same two passes on its layout; grad_x is in x's.
    """
    kernel = _native.for_tensor("activations", x, openmp=True)
    if kernel is not None and channels_last_format(x) is not None:
        rows = x.shape[0], x.shape[1], -1
        grad_x, grad_weight, grad_bias = kernel.channel_batch_norm_backward(
            grad.reshape(rows), x.reshape(rows), weight, mean, inv_std)
        return grad_x.view(x.shape), grad_weight, grad_bias
    return torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, None, None, mean, inv_std, True, 0.0, [True, True, True])


def in_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` in `dtype` (None stays None); as Tensor.to, without its dispatch where nothing
    changes (at batch 1 each call is felt)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """torch.channels_last or channels_last_3d where x is laid out so and not also
    contiguous (its channels or positions one), else None."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is None or x.is_contiguous() or \
            not x.is_contiguous(memory_format=channels_last):
        return None
    return channels_last


def in_memory_format_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out` (x's shape) in x's memory format when x is channels_last or channels_last_3d
    (copied only if it is not already), else as it is."""
    channels_last = channels_last_format(x)
    return out if channels_last is None else out.contiguous(memory_format=channels_last)


def autocast_off(x: torch.Tensor):
    """Autocast disabled for `x`'s device: the math run under it picks its own dtypes.
    Where it is not enabled, nothing (entering torch.autocast costs ~3 us: at batch 1 a
    tenth of a normalizer's step)."""
    if x.device.type == "meta" or not _autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()
