"""FastNorm's math: weight normalization whose norms are tracked, not computed.

From "FastNorm: Improving Numerical Stability of Deep Network Training with
Efficient Normalization" (anonymous, 2019 submission). The layers
(:mod:`normlab.layers.fastnorm`) compute explicit weight normalization's function,
z_i = gain_i (W_i . h) / ||W_i|| + bias_i, but an SGD step never rescales the weight
matrix and, in the default *fused* mode, never builds a dense gradient either:

The weight-normalization gradient of row i over a batch of B samples is
grad_i = sum_b a_bi h_b - kappa_i W_i, with a_bi = gain_i t_i delta_bi,
t_i = 1 / ||W_i||, p_bi = W_i . h_b and kappa_i = t_i^2 (a_i . p_i). An SGD
step with weight decay wd is therefore

    W_i' = c_i W_i - lr sum_b a_bi h_b,     c_i = 1 - lr wd + lr kappa_i,

a per-row scale plus a rank-B update. The layer stores W = diag(s) V: the
per-row scalars s absorb c (s' = c s) and only the rank-B part touches the
stored matrix, V' = V - (lr / s') A^T H: one `addmm_` (`fused_sgd_step`). Since
grad_i is orthogonal to W_i, the new norms follow from the B samples alone,

    ||W_i'||^2 = (1 - lr wd)^2 ||W_i||^2 + lr^2 (a_i^T K a_i - t_i^2 (a_i . p_i)^2),

with K = H H^T: O(B^2 (n + m)) instead of O(mn) (`tracked_sq_norms`). The
forward reads 1 / ||V_i|| = t_i s_i (`stored_inv_norms`).

On CPU, up to KERNEL_MAX_BATCH samples, the fused mode's training forward,
its backward and the step each run as one compiled call (csrc/fastnorm.cpp,
built on first use by normlab._ext.loader; `compiled_kernel` says where), since
at small batches the dozens of small tensor operations of the eager path cost
more than the arithmetic. The forward (`recorded_linear`) gives a per-forward
leaf ("probe") the output gradient dL/dz, which is how the step gets its samples
without a Python hook; the compiled step also applies SGD to the gain and bias.
The eager functions here compute the same and are the specification (tests
compare them).

The dense mode's forward routes V through `with_logical_gradient`, so that autograd
gives V the true gradient with respect to the logical weight W.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from .._ext import loader

# The compiled kernels (csrc/fastnorm.cpp) remove per-operation dispatch, which
# dominates at small batches; their loops are single-threaded where torch's
# elementwise operations are threaded. Measured against the eager path (784-1024-10
# MLP step, 2 threads, alternating in one process, 2026-12-02): 0.80x at batch 32,
# 0.99x at 128, 1.00x at 512; above that the eager path runs.
KERNEL_MAX_BATCH = 512


def stored_inv_norms(inv_norm: torch.Tensor, row_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """1 / ||V_i|| = t_i s_i, in `dtype`: the scale that the stored rows V need."""
    return _as(inv_norm * row_scale, dtype)


class _LogicalGradient(torch.autograd.Function):
    """Identity on V forward; backward turns autograd's gradient for V into the
    weight-normalization gradient of the logical weight W = diag(s) V.

    With the scale 1/||V_i|| = u_i held fixed in the forward, autograd gives
    G_i = gain_i u_i sum_b delta_bi h_b; the true gradient of W_i is
    (G_i - u_i^2 (G_i . V_i) V_i) / s_i (the part along the row removed, as
    d(1/||W_i||)/dW_i contributes, and the chain rule through W = s V).
    """

    @staticmethod
    def forward(ctx, weight, inv_norm_stored, row_scale):
        ctx.save_for_backward(weight, inv_norm_stored, row_scale)
        return weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weight, inv_norm_stored, row_scale = ctx.saved_tensors
        shape = (-1,) + (1,) * (weight.dim() - 1)
        along = (grad * weight).flatten(1).sum(1) * inv_norm_stored.square()
        projected = torch.addcmul(grad, weight, along.view(shape).to(grad.dtype), value=-1)
        return projected.div_(row_scale.view(shape).to(grad.dtype)), None, None


def with_logical_gradient(weight: torch.Tensor, inv_norm_stored: torch.Tensor,
                          row_scale: torch.Tensor) -> torch.Tensor:
    """The stored rows V (`weight`) as they are, whose gradient autograd gives as the
    weight-normalization gradient of the logical weight W = diag(`row_scale`) V, for a
    function that scales V's rows by `inv_norm_stored` = 1 / ||V_i|| held fixed."""
    return _LogicalGradient.apply(weight, inv_norm_stored, row_scale)


class RecordedForward:
    """One training forward of `recorded_linear`: its inputs h and pre-scale outputs
    q = V h, each (B, features), and a (B, m) leaf whose gradient autograd fills with
    dL/dz: the output gradients delta (summed over backwards, as gradients are)."""

    __slots__ = ("inputs", "outputs", "probe")

    def __init__(self, inputs: torch.Tensor, outputs: torch.Tensor, probe: torch.Tensor):
        self.inputs, self.outputs, self.probe = inputs, outputs, probe

    @property
    def output_grads(self) -> torch.Tensor | None:
        return self.probe.grad


def recorded_linear(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None,
                    weight: torch.Tensor, inv_norm: torch.Tensor, row_scale: torch.Tensor,
                    records: list[RecordedForward]) -> torch.Tensor:
    """The fused mode's training forward, z = gain * t s * (V h) + bias (t s = 1/||V_i||),
    appending its samples to `records`; V gets no gradient (FastNormSGD updates it).
    Under torch.compile it runs outside the graph (one graph break): a traced backward
    would record at trace time only."""
    record = _recorded_linear_untraced if loader.tracing() else _recorded_linear
    return record(x, gain, bias, weight, inv_norm, row_scale, records)


def _recorded_linear(x, gain, bias, weight, inv_norm, row_scale, records):
    rows = _rows(x)
    probe = torch.empty(rows.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device,
                        requires_grad=True)
    kernel = compiled_kernel(rows, inv_norm, row_scale, weight, gain, bias)
    function = _RecordedLinear.apply if kernel is None else kernel.recorded_linear
    z, q = function(rows, gain, bias, probe, weight.detach(), inv_norm, row_scale)
    records.append(RecordedForward(rows.detach(), q, probe))
    return z if x.dim() == 2 else z.view(*x.shape[:-1], z.shape[-1])


_recorded_linear_untraced = torch.compiler.disable(_recorded_linear)


class _RecordedLinear(torch.autograd.Function):
    """`recorded_linear`'s autograd function: returns (z, q) and gives the probe dL/dz.
    The eager path, and the specification, of RecordedLinear in csrc/fastnorm.cpp."""

    @staticmethod
    def forward(ctx, rows, gain, bias, probe, weight, inv_norm, row_scale):
        q = F.linear(rows, weight)
        scale = gain * stored_inv_norms(inv_norm, row_scale, weight.dtype)
        z = q * scale if bias is None else torch.addcmul(bias, q, scale)
        ctx.mark_non_differentiable(q)
        ctx.set_materialize_grads(False)  # q's gradient stays None: no zeros made
        ctx.save_for_backward(weight, gain, inv_norm, row_scale, q)
        return z, q

    @staticmethod
    def backward(ctx, output_grads, _):
        if torch.is_grad_enabled():  # (cheaper than once_differentiable's wrapper)
            raise RuntimeError("FastNormLinear(mode='fused') has no double backward "
                               "(create_graph=True); use mode='dense'")
        weight, gain, inv_norm, row_scale, q = ctx.saved_tensors
        inv_norm_stored = stored_inv_norms(inv_norm, row_scale, weight.dtype)
        needs_x, _, needs_bias = ctx.needs_input_grad[:3]
        grad_x = F.linear(output_grads * (gain * inv_norm_stored), weight.T) if needs_x else None
        grad_gain = (output_grads * q).sum(0) * inv_norm_stored
        grad_bias = output_grads.sum(0) if needs_bias else None
        return grad_x, grad_gain, grad_bias, output_grads, None, None, None


def compiled_kernel(rows: torch.Tensor, inv_norm: torch.Tensor, row_scale: torch.Tensor,
                    *like_rows: torch.Tensor | None):
    """The compiled fused-mode kernels (csrc/fastnorm.cpp) where they apply, else None:
    CPU, at most KERNEL_MAX_BATCH `rows`, no autocast, t and s of one dtype, the tensors
    `like_rows` (weight, gain, ...; None skipped) of the rows' dtype."""
    if (not rows.is_cpu or rows.shape[0] > KERNEL_MAX_BATCH
            or inv_norm.dtype != row_scale.dtype or _cpu_autocast()):
        return None
    dtype = rows.dtype
    for x in like_rows:
        if x is not None and x.dtype != dtype:
            return None
    return loader.module("fastnorm")


try:
    torch.is_autocast_enabled("cpu")
    _cpu_autocast = functools.partial(torch.is_autocast_enabled, "cpu")
except TypeError:  # torch < 2.4
    _cpu_autocast = torch.is_autocast_cpu_enabled


def step_coefficients(outputs: torch.Tensor, output_grads: torch.Tensor, gain: torch.Tensor,
                      inv_norm: torch.Tensor,
                      row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, a * p), each (B, m), in the dtype of t (`inv_norm`): a_bi = gain_i t_i delta_bi
    and p_bi = W_i . h_b = s_i q_bi, from the recorded outputs q and gradients delta.
    Summed over the samples, a * p gives a_i . p_i; summed over everything, it equals
    sum_i gain_i dL/dgain_i (how a layer checks that its samples explain its gradient)."""
    compute = inv_norm.dtype
    a = _as(output_grads, compute) * (_as(gain, compute) * inv_norm)
    return a, a * _as(outputs, compute) * row_scale


def tracked_sq_norms(sq_norms: torch.Tensor, inputs: torch.Tensor, coefficients: torch.Tensor,
                     a_dot_p: torch.Tensor, kappa: torch.Tensor, lr: float,
                     weight_decay: float) -> torch.Tensor:
    """||W_i'||^2 after W' = (1 - lr wd) W - lr grad, from the B samples alone.

    `inputs` (B, n) are the h_b and `coefficients` (B, m) the a_bi = gain_i t_i
    delta_bi, so that grad_i = sum_b a_bi h_b - kappa_i W_i with, per row,
    `a_dot_p` = a_i . p_i (p_bi = W_i . h_b) and `kappa` = t_i^2 (a_i . p_i).
    As grad_i is orthogonal to W_i, ||grad_i||^2 = a_i^T H H^T a_i - kappa_i (a_i . p_i).
    Costs O(B^2 (n + m)).
    """
    a = coefficients
    a_gram_a = ((inputs @ inputs.T @ a) * a).sum(0)
    grad_sq = a_gram_a.sub_(kappa * a_dot_p).clamp_min_(0)  # rounding can go below 0
    return torch.add(sq_norms * (1 - lr * weight_decay) ** 2, grad_sq, alpha=lr**2)


def fused_sgd_step(inputs: torch.Tensor, coefficients: torch.Tensor, a_dot_p: torch.Tensor,
                   weight: torch.Tensor, inv_norm: torch.Tensor, row_scale: torch.Tensor,
                   lr: float, weight_decay: float, track: bool) -> None:
    """One SGD step of the logical weight W = diag(s) V as s' = c s and
    V' = V - lr (A / s')^T H, c = 1 - lr wd + lr kappa, kappa = t^2 (a . p), in place on
    `row_scale` (s) and `weight` (V), under torch.no_grad; if `track`, t (`inv_norm`)
    becomes the tracked 1 / ||W_i'||. `coefficients` and `a_dot_p` as `tracked_sq_norms`.
    The eager path, and the specification, of the compiled step in csrc/fastnorm.cpp
    (which also checks the samples against the gain's gradient and steps the gain and
    bias)."""
    a = coefficients
    sq_inv_norm = inv_norm.square()
    kappa = sq_inv_norm * a_dot_p
    if track:
        sq_norms = tracked_sq_norms(sq_inv_norm.reciprocal_(), _as(inputs, a.dtype), a,
                                    a_dot_p, kappa, lr, weight_decay)
        torch.rsqrt(sq_norms.clamp_min_(torch.finfo(sq_norms.dtype).tiny), out=inv_norm)
    row_scale.mul_(kappa.mul_(lr).add_(1 - lr * weight_decay))
    weight.addmm_(_as(a / row_scale, weight.dtype).T, _as(inputs, weight.dtype), alpha=-lr)


def logical_weight_gradient(inputs: torch.Tensor, coefficients: torch.Tensor,
                            a_dot_p: torch.Tensor, logical_weight: torch.Tensor,
                            inv_norm: torch.Tensor) -> torch.Tensor:
    """The dense gradient of the logical weight W from the recorded samples,
    A^T H - t^2 (a . p) W (arguments as `tracked_sq_norms`), in the coefficients' dtype."""
    a = coefficients
    kappa = inv_norm.square() * a_dot_p
    return torch.addmm(logical_weight.to(a.dtype) * -kappa[:, None], a.T, _as(inputs, a.dtype))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(*, features) as (rows, features)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # skips the dispatch of a no-op .to(): the fused step is a chain of tiny ops at batch 1
    return x if x.dtype == dtype else x.to(dtype)
