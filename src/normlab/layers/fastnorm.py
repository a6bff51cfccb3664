"""FastNorm's layers: weight normalization whose norms are tracked, not computed.

From "FastNorm: Improving Numerical Stability of Deep Network Training with
Efficient Normalization" (anonymous, 2019 submission). The math (the fused step,
the tracked norms, the autograd functions and the compiled kernels' dispatch) is
:mod:`normlab.functional.fastnorm`; its docstring derives it. Here: the layers,
which hold W = diag(s) V (`weight` V, buffers `row_scale` s and `inv_norm`
t = 1 / ||W_i||), and the interface their optimizer, :class:`~normlab.FastNormSGD`,
uses: `layer_of` and `registrations` find the layers among the parameters, and each
layer's `sgd_step` and `discard_finished_records` step them.

In the default *fused* mode (FastNormLinear) an SGD step is a per-row scale of s
and a rank-B update of V, with the norms tracked from the B samples. Above
`max_tracked_batch` samples the norms are computed explicitly after the fused
update instead (the Gram matrix then costs more than one pass over V).

Renormalization (every `renorm_every` steps, or `renormalize()`) divides the
rows of V by their norms and moves those norms into s, so the logical
weight W, hence the training trajectory, is unchanged up to rounding, and
refreshes t from the explicit norms (bounding the drift of the tracking in
low precision). The paper's reset of ||W_i|| to 1, which also resets weight
normalization's effective learning rate, is the option `renorm_resets_norm`.

The *dense* mode (`mode="dense"`, and `FastNormConv1d/2d/3d` always) is the
paper's hybrid mode: autograd gives `weight.grad` the true gradient with
respect to the logical weight W (torch's `weight_norm`'s v), so gradient
clipping, DDP's all-reduce and inspection work on it; after the update the
norms are computed explicitly, and the scale is still applied to the
outputs, never to the weights. Momentum builds a dense buffer in either
mode (the buffer of a sum of rank-B updates is full rank): in the fused
mode the step then materializes the gradient from the recorded samples into
it and computes the norms explicitly.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks
from .._ext.loader import tracing as _tracing
from ..distributed import HasSyncedForm
from ..functional import fastnorm as fastnorm_math
from ._base import ConvGeometry, SourceWeight, WeightNormalizedLayer, plain_args
from .weight_norm import INPUT_STATS

# Measured with `normlab bench --case fastnorm_crossover` (the 784-1024-10 MLP step,
# compiled, 2 threads, 2026-12-02): tracked / explicit norms 0.77x at batch 2, 0.93x at
# 16, 0.99x at 32, 1.11x at 64, 1.4x at 128, so the explicit norms take over above 16.
DEFAULT_MAX_TRACKED_BATCH = 16
# Measured with `tools/fastnorm_drift.py --every 100` (the FastNorm paper's
# 784-1024-10 MLP, batch 16, lr 0.05, fused mode, no renormalization): the
# tracked norms drift from the explicit ones by 1.7e-5 (relative, max over rows)
# in 1000 float32 steps, and in bfloat16 (t and s kept in float32) by about
# 5e-5 per step: 1.0e-2 at 200 steps, 2.6e-2 at 500, 5.8e-2 at 1000.
# Renormalizing every 200 steps keeps bfloat16 well within RENORM_DRIFT_BOUND;
# it keeps the trajectory and costs one pass over the weight per 200 steps.
DEFAULT_RENORM_EVERY = 200
RENORM_DRIFT_BOUND = 0.05

# public names that moved to normlab.functional.fastnorm with the math: old name, warned
_MOVED_TO_FUNCTIONAL = ("KERNEL_MAX_BATCH", "tracked_sq_norms")


def __getattr__(name: str):
    if name in _MOVED_TO_FUNCTIONAL:
        warnings.warn(f"normlab.layers.fastnorm.{name} is now "
                      f"normlab.functional.fastnorm.{name}", DeprecationWarning, stacklevel=2)
        return getattr(fastnorm_math, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# id(weight Parameter) -> its layer, held weakly: behind `layer_of` (a plain dict
# lookup per parameter and step; the owner's `weight is param` check rules out reused ids).
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_owners_changed = [0]  # counts registrations: behind `registrations`


def layer_of(param: torch.Tensor) -> _FastNorm | None:
    """The FastNorm layer whose weight `param` is, or None: how an optimizer, which sees only
    parameters, finds the FastNorm layers among them (FastNormSGD does)."""
    layer = _OWNERS.get(id(param))
    return layer if layer is not None and layer.weight is param else None


def registrations() -> int:
    """A count that grows whenever a layer takes a new weight Parameter (built, copied,
    loaded): an optimizer that caches `layer_of`'s answers refreshes them when it changes."""
    return _owners_changed[0]


class _Tracking:
    """A layer's bookkeeping between forward and step, in one mutable object
    (nn.Module's __setattr__ is slow on the per-step path)."""

    __slots__ = ("weight_id", "weight_version", "steps_since_renorm", "records")

    def __init__(self):
        self.weight_id, self.weight_version, self.steps_since_renorm = None, None, 0
        self.records: list[fastnorm_math.RecordedForward] = []


class _FastNorm(nn.Module, WeightNormalizedLayer, HasSyncedForm):
    """What FastNormLinear and FastNormConv1d/2d/3d share: W = diag(s) V, the tracked
    t = 1 / ||W_i||, the scaled output, renormalization, the optimizer's step."""

    _modes: tuple[str, ...] = ("fused", "dense")
    input_activation: str | None = None  # NormProp's input standardization (Linear only)

    def _init_fastnorm(self, weight_shape: tuple[int, ...], bias: bool, mode: str,
                       renorm_every: int | None, renorm_resets_norm: bool, device, dtype):
        if renorm_every is not None:
            checks.positive_int(type(self).__name__, "renorm_every (or None)", renorm_every)
        self.mode, self.renorm_every = mode, renorm_every
        self.renorm_resets_norm = bool(renorm_resets_norm)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        out = weight_shape[0]
        self.gain = nn.Parameter(torch.empty(out, **factory))
        self.bias = nn.Parameter(torch.empty(out, **factory)) if bias else None
        # t and s are kept in at least float32 (see _apply)
        scalar = {"device": device,
                  "dtype": torch.promote_types(self.weight.dtype, torch.float32)}
        self.register_buffer("inv_norm", torch.ones(out, **scalar))
        self.register_buffer("row_scale", torch.ones(out, **scalar))
        self.register_buffer("steps_since_renorm", torch.zeros((), dtype=torch.long,
                                                               device=device))
        self._tracking = _Tracking()
        self.reset_parameters()

    def use_synced_form(self, process_group=None) -> None:
        # the fused update reads only this process's samples; the dense gradient is what
        # DDP all-reduces
        self.mode = "dense"

    def reset_parameters(self) -> None:
        """The function of the freshly initialized torch layer, with unit-norm rows."""
        reference = self.plain_type(**plain_args(self))
        self._load(reference.weight, reference.bias)

    def _load_source(self, source: SourceWeight) -> None:
        """The torch layer's function, its rows stored normalized; standardizing the input
        shifts it, so a layer with `input_activation` gets a bias even if the source has
        none."""
        if self.bias is None and self.input_activation is not None:
            self.bias = nn.Parameter(torch.zeros_like(self.gain))
        self._load(source.weight, source.bias)

    @torch.no_grad()
    def _load(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # gain_i = ||W_i||, rows stored normalized; a zero row gets gain 0 and
        # an arbitrary unit row (the function, 0, is kept; no 0/0).
        norms = weight.flatten(1).norm(dim=1).view(self._row_shape())
        unit = torch.full_like(weight, 1 / math.sqrt(weight[0].numel()))
        self.weight.copy_(torch.where(norms > 0, weight / torch.where(norms > 0, norms, 1), unit))
        self.gain.copy_(norms.flatten())
        if self.bias is not None:
            self.bias.copy_(bias) if bias is not None else self.bias.zero_()
        stats = INPUT_STATS[self.input_activation]
        if stats is not None:  # undo the standardization x~ = (x - mean) / std
            mean, std = stats
            self.gain.mul_(std)
            if self.bias is not None:
                self.bias.add_(weight.flatten(1).sum(1), alpha=mean)
        self.inv_norm.fill_(1)
        self.row_scale.fill_(1)
        self._declare_consistent()

    def _row_shape(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self.weight.dim() - 1)

    def _declare_consistent(self) -> None:
        """Declare V, s and t consistent as they are now."""
        self._tracking.steps_since_renorm = 0
        self.steps_since_renorm.zero_()
        self._tracking.records.clear()
        self._note_weight_identity()

    def _note_weight_identity(self) -> None:
        # The identity tells a new Parameter (deepcopy) from an in-place change.
        tracking, weight = self._tracking, self._parameters["weight"]  # (a per-step path)
        if tracking.weight_id != id(weight):
            tracking.weight_id = id(weight)
            _OWNERS[id(weight)] = self
            _owners_changed[0] += 1
        tracking.weight_version = weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.input_activation is not None:
            # explicitly (one pass over x), so that the rank-B update reads x~
            mean, std = INPUT_STATS[self.input_activation]
            x = (x - mean) / std
        # dict lookups: nn.Module's attribute fallback is slow on this per-step path
        params, buffers = self._parameters, self._buffers
        weight, gain, bias = params["weight"], params["gain"], params.get("bias")
        row_scale, inv_norm = buffers["row_scale"], buffers["inv_norm"]
        fused = self._mode == "fused"
        tracing = _tracing()
        if not tracing:  # Python-side bookkeeping, which a traced graph cannot hold
            tracking = self._tracking
            if tracking.weight_id != id(weight):
                self._note_weight_identity()
            elif tracking.weight_version != weight._version:
                self._weight_changed_outside()
            if fused and tracking.records:
                self._drop_stale_records()
        if fused and self.training and weight.requires_grad and torch.is_grad_enabled():
            # the step needs this forward's samples (fused: FastNormLinear only)
            return fastnorm_math.recorded_linear(x, gain, bias, weight, inv_norm, row_scale,
                                                 self._tracking.records)
        inv_norm_stored = fastnorm_math.stored_inv_norms(inv_norm, row_scale, weight.dtype)
        if fused:
            q = self._map(x, weight.detach())
        else:
            q = self._map(x, fastnorm_math.with_logical_gradient(weight, inv_norm_stored,
                                                                 row_scale))
        scale = self._per_output(gain * inv_norm_stored)
        return q * scale if bias is None else torch.addcmul(self._per_output(bias), q, scale)

    @torch.no_grad()
    def _weight_changed_outside(self) -> None:
        # Dense mode computes its norms explicitly anyway: recompute them once.
        # The fused mode's update of W exists only in FastNormSGD.
        if self.mode == "dense":
            self._refresh_norms()
            return
        raise RuntimeError(
            f"{type(self).__name__}(mode='fused'): the weight was changed outside FastNormSGD "
            "(by another optimizer, an in-place edit, or DistributedDataParallel's initial "
            "broadcast), so the tracked norms are stale. Train it with normlab.FastNormSGD; "
            "under DDP use mode='dense' (normlab.convert_sync(model) switches it); after "
            "editing the weight on purpose, call renormalize().")

    @property
    def mode(self) -> str:
        """``"fused"`` or ``"dense"``; switching drops the samples recorded so far."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in self._modes:
            raise ValueError(f"{type(self).__name__}: mode must be one of {self._modes}, "
                             f"got {mode!r}")
        self._mode = mode
        if hasattr(self, "_tracking"):
            self._tracking.records.clear()

    def _drop_stale_records(self) -> None:
        # A gain without a gradient means the gradients were zeroed since the
        # recorded backwards ran: unless FastNormSGD consumed them, an update
        # of W was lost (another optimizer took the step).
        if self.gain.grad is None and self.gain.requires_grad and any(
                r.output_grads is not None for r in self._tracking.records):
            self._tracking.records.clear()
            raise RuntimeError(
                f"{type(self).__name__}: gradients were zeroed without a FastNormSGD step, so "
                "the recorded update of the weight was lost. In the default mode='fused' the "
                "weight is updated only by normlab.FastNormSGD (its zero_grad() discards a "
                "skipped step cleanly); use mode='dense' for a weight.grad that other tools "
                "read.")

    def tracked_norms(self) -> torch.Tensor:
        """1 / t: the row norms ||W_i|| of the logical weight, as tracked."""
        return self.inv_norm.reciprocal()

    @torch.no_grad()
    def explicit_norms(self) -> torch.Tensor:
        """||W_i|| = |s_i| ||V_i||, computed (O(mn)) in the dtype of t.

        (s_i < 0 where an SGD step took the row through the origin:
        c = 1 - lr wd + lr kappa < 0.)"""
        stored = torch.linalg.vector_norm(self.weight.flatten(1), dim=1,
                                          dtype=self.inv_norm.dtype)
        return self.row_scale.abs() * stored

    @torch.no_grad()
    def logical_weight(self) -> torch.Tensor:
        """W = diag(s) V: the weight whose norms are tracked (torch weight_norm's v)."""
        return self.weight * self.row_scale.view(self._row_shape()).to(self.weight.dtype)

    @torch.no_grad()
    def renormalize(self, reset_norm: bool | None = None) -> None:
        """Normalize the stored rows; the function is unchanged.

        By default the logical norms move into the per-row scalars, so training
        continues on the same trajectory, and t is refreshed from them.
        `reset_norm=True` (default: the layer's `renorm_resets_norm`) instead
        sets ||W_i|| = 1, as the paper does, which also resets weight
        normalization's effective learning rate.
        """
        reset = self.renorm_resets_norm if reset_norm is None else reset_norm
        stored = torch.linalg.vector_norm(self.weight.flatten(1), dim=1,
                                          dtype=self.inv_norm.dtype)
        stored = stored.clamp_min(torch.finfo(stored.dtype).tiny)
        self.weight.div_(stored.view(self._row_shape()).to(self.weight.dtype))
        if reset:
            self.row_scale.fill_(1)
        else:
            self.row_scale.mul_(stored)
        self.inv_norm.copy_(self.explicit_norms().reciprocal())
        self._declare_consistent()

    @torch.no_grad()
    def to_plain(self, input_size=None) -> nn.Module:
        """A plain torch layer computing this layer's function."""
        scale = (self.gain * self.inv_norm * self.row_scale).to(self.weight.dtype)
        kernel = self.weight * scale.view(self._row_shape())
        bias = self.bias
        stats = INPUT_STATS[self.input_activation]
        if stats is not None:  # W x~ = (W / std) x - (mean / std) W 1
            mean, std = stats
            kernel = kernel / std
            shift = -mean * kernel.flatten(1).sum(1)
            bias = shift if bias is None else bias + shift
        return self._plain_with(kernel, bias)

    # -- the optimizer's interface (FastNormSGD calls these) ------------------------

    def discard_finished_records(self) -> None:
        """Forget the recorded forwards whose backward has run (their gradient is gone: the
        optimizer's zero_grad calls this)."""
        self._tracking.records = [r for r in self._tracking.records if r.output_grads is None]

    def sgd_step(self, lr: float, weight_decay: float, momentum: float, state: dict) -> tuple:
        """One SGD step of this layer's weight, as its mode prescribes (module docstring),
        under no_grad; `state` is the optimizer's state for the weight. Returns the other
        parameters it updated (the optimizer leaves them alone)."""
        # Returns the other parameters it updated: the
        # compiled fused step also takes the gain's and bias's SGD update.
        updated = ()
        if self._mode == "dense":
            if self.weight.grad is None:
                return updated
            self._dense_update(self.weight.grad.to(self.inv_norm.dtype), lr, weight_decay,
                               momentum, state)
        else:
            samples = self._consume_records()
            if samples is None:
                return updated
            if momentum:
                self._dense_update(self._materialized_gradient(*samples), lr, weight_decay,
                                   momentum, state)
            else:
                updated = self._fused_update(*samples, lr, weight_decay)
        self._note_weight_identity()
        tracking = self._tracking
        tracking.steps_since_renorm += 1
        if self.renorm_every is not None and tracking.steps_since_renorm >= self.renorm_every:
            self.renormalize()
        else:
            self._buffers["steps_since_renorm"].fill_(tracking.steps_since_renorm)
        return updated

    def _consume_records(self):
        """(h, q, delta) of the recorded samples, each (B, features); None when none."""
        records = [r for r in self._tracking.records if r.output_grads is not None]
        self._tracking.records.clear()
        if not records:
            if self.gain.grad is not None and self.gain.grad.any():
                raise RuntimeError(
                    f"{type(self).__name__}: the gain has a gradient but no recorded samples "
                    "explain it (a backward through an eval-mode forward?). mode='fused' "
                    "records training-mode forwards only; use mode='dense' otherwise.")
            return None
        if len(records) == 1:
            return records[0].inputs, records[0].outputs, records[0].output_grads
        return tuple(torch.cat([getattr(r, f) for r in records])
                     for f in ("inputs", "outputs", "output_grads"))

    def _coefficients(self, outputs, output_grads):
        """a_bi = gain_i t_i delta_bi and a_i . p_i (p_bi = W_i . h_b = s_i q_bi), in the
        dtype of t, once checked to explain the gain's gradient."""
        compute, gain = self.inv_norm.dtype, self.gain.detach()
        a, a_p = fastnorm_math.step_coefficients(outputs, output_grads, gain, self.inv_norm,
                                                 self.row_scale)
        grad = self.gain.grad
        gain_dot_grad = 0.0 if grad is None else float(torch.dot(gain.to(compute),
                                                                 grad.to(compute)))
        self._check_explained(gain_dot_grad, float(a_p.sum()),
                              float(torch.linalg.vector_norm(a_p, 1)))
        return a, a_p.sum(0)

    def _check_explained(self, gain_dot_grad: float, explained: float, magnitude: float) -> None:
        # The samples must explain the accumulated gradient (a backward we did
        # not record, gradients zeroed in place): sum_i gain_i dL/dgain_i =
        # sum_i a_i . p_i (`explained`), up to the rounding of both sides,
        # which scales with sum |a_bi p_bi| (`magnitude`).
        grad = self.gain.grad
        if grad is None:
            return
        rounding = magnitude * math.sqrt(torch.finfo(grad.dtype).eps)
        if abs(gain_dot_grad - explained) > rounding + 1e-30:
            self._raise_unexplained()

    def _raise_unexplained(self):
        raise RuntimeError(
            f"{type(self).__name__}: the recorded samples do not explain the gradient "
            "(gradients zeroed in place, or a backward through an unrecorded forward). "
            "With mode='fused', zero gradients with FastNormSGD.zero_grad() or "
            "set_to_none=True; use mode='dense' for other workflows.")

    def _fused_update(self, inputs, outputs, output_grads, lr: float,
                      weight_decay: float) -> tuple:
        # W' = c W - lr A^T H with c = 1 - lr wd + lr kappa, kappa = t^2 (a . p):
        # s' = c s, V' = V - lr (A / s')^T H
        params, buffers = self._parameters, self._buffers  # (as in forward)
        weight, gain, bias = params["weight"], params["gain"], params.get("bias")
        inv_norm, row_scale = buffers["inv_norm"], buffers["row_scale"]
        track = inputs.shape[0] <= self.max_tracked_batch
        kernel = fastnorm_math.compiled_kernel(outputs, inv_norm, row_scale, output_grads, gain,
                                               weight, bias)
        updated = ()
        if kernel is None:  # the eager path, the compiled step's specification
            a, a_dot_p = self._coefficients(outputs, output_grads)
            fastnorm_math.fused_sgd_step(inputs, a, a_dot_p, weight, inv_norm, row_scale, lr,
                                         weight_decay, track)
        elif kernel.fused_step(inputs, outputs, output_grads, gain, inv_norm, row_scale, weight,
                               gain.grad, bias, None if bias is None else bias.grad, lr,
                               weight_decay, track):
            updated = (gain,) if bias is None else (gain, bias)
        else:
            self._raise_unexplained()
        if not track:  # above max_tracked_batch: explicit, after the update
            inv_norm.copy_(self.explicit_norms().clamp_min_(torch.finfo(inv_norm.dtype).tiny)
                           .reciprocal_())
        return updated

    def _materialized_gradient(self, inputs, outputs, output_grads) -> torch.Tensor:
        """The dense gradient of the logical weight, A^T H - t^2 (a . p) W."""
        a, a_dot_p = self._coefficients(outputs, output_grads)
        return fastnorm_math.logical_weight_gradient(inputs, a, a_dot_p, self.logical_weight(),
                                                     self.inv_norm)

    def _dense_update(self, grad: torch.Tensor, lr: float, weight_decay: float,
                      momentum: float, state: dict) -> None:
        """torch.optim.SGD's update of the logical weight; norms computed explicitly."""
        shape = self._row_shape()
        direction = grad.view_as(self.weight)
        if weight_decay:
            direction = direction + weight_decay * self.logical_weight().to(grad.dtype)
        if momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = direction.clone()
            else:
                buffer.mul_(momentum).add_(direction)
            direction = buffer
        # W' = W - lr d, W = s V: V' = V - (lr / s) d, s unchanged
        self.weight.addcmul_(direction.to(self.weight.dtype),
                             (-lr / self.row_scale).view(shape).to(self.weight.dtype))
        self.inv_norm.copy_(self.explicit_norms().clamp_min(
            torch.finfo(self.inv_norm.dtype).tiny).reciprocal())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # t and s stay at least float32: in bfloat16 the per-step increments of
        # the tracked norms fall below its resolution and the tracking stalls.
        for name in ("inv_norm", "row_scale"):
            buffer = getattr(self, name)
            if buffer.is_floating_point() and buffer.dtype.itemsize < 4:
                setattr(self, name, buffer.float())
        # A new dtype rounds the rows differently: t from the rows as they are now.
        self._refresh_norms()
        return self

    @torch.no_grad()
    def _refresh_norms(self) -> None:
        """t computed from the weight as it is (one pass), declared consistent."""
        self.inv_norm.copy_(self.explicit_norms().reciprocal())
        self._note_weight_identity()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the per-row scale: s = 1
        state_dict.setdefault(prefix + "row_scale", torch.ones_like(self.row_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        steps = int(self.steps_since_renorm)
        self._declare_consistent()
        self._tracking.steps_since_renorm = steps
        self.steps_since_renorm.fill_(steps)

    def _extra_repr_tail(self) -> str:
        return (f"mode={self.mode!r}, renorm_every={self.renorm_every}"
                + (", renorm_resets_norm=True" if self.renorm_resets_norm else ""))


class FastNormLinear(_FastNorm):
    r"""Weight-normalized linear layer with tracked row norms and a fused SGD update (FastNorm).

    .. math::
        z_i = \gamma_i \, \frac{W_i \cdot h}{\|W_i\|} + \beta_i, \qquad W = \mathrm{diag}(s) V

    the function of explicit weight normalization. `weight` holds V; the per-row
    scalars s (buffer `row_scale`) and t = 1 / ||W_i|| (buffer `inv_norm`) are
    kept by :class:`FastNormSGD`, which in the default fused mode applies an SGD
    step as a rank-B update of V and tracks the norms from the B samples
    (:mod:`normlab.functional.fastnorm` derives it). Train it with :class:`FastNormSGD`.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        mode: ``"fused"`` (default: no dense gradient; `weight.grad` stays None)
            or ``"dense"`` (`weight.grad` holds the gradient of the logical
            weight W; norms computed explicitly after each step: the paper's
            hybrid mode, for gradient clipping, DDP and inspection).
        renorm_every: optimizer steps between renormalizations of the stored rows
            (None: never). They keep the trajectory; default from the measured
            drift of the tracking in bfloat16 (module docstring).
        renorm_resets_norm: renormalize as the paper does, resetting ||W_i|| to 1
            (changes the trajectory: the effective learning rate resets).
        max_tracked_batch: above this many samples per step the norms are
            computed explicitly after the fused update; default the measured
            crossover.
        input_activation: ``"relu"`` standardizes the input as NormProp does
            (:class:`~normlab.NormPropLinear`: the input is a ReLU output of a
            unit Gaussian, x~ = (x - sqrt(1/(2 pi))) / sqrt((1 - 1/pi) / 2)),
            one pass over x, so that the layer is NormProp's with tracked norms
            (the FastNorm paper's setting); None (default) uses x as it is.
            ``normlab.convert(model, "fastnorm", input_activation="relu")``
            leaves the first layer unstandardized, as for NormProp.
        device, dtype: as torch.nn modules; t and s are kept in at least float32.

    Shape:
        - Input: :math:`(*, H_{in})`; Output: :math:`(*, H_{out})`.

    Example:
        >>> layer = FastNormLinear(784, 1024)
        >>> optimizer = normlab.FastNormSGD(layer.parameters(), lr=0.05)
        >>> layer(torch.randn(16, 784)).square().mean().backward()
        >>> optimizer.step()
        >>> torch.allclose(layer.tracked_norms(), layer.explicit_norms())
        True
    """

    plain_type = nn.Linear
    first_layer_kw = {"input_activation": None}  # a model's input is no ReLU output

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mode: str = "fused", renorm_every: int | None = DEFAULT_RENORM_EVERY,
                 renorm_resets_norm: bool = False,
                 max_tracked_batch: int = DEFAULT_MAX_TRACKED_BATCH,
                 input_activation: str | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("max_tracked_batch", max_tracked_batch)):
            checks.positive_int("FastNormLinear", name, value)
        checks.one_of("FastNormLinear", "input_activation", input_activation, INPUT_STATS,
                      " ('relu': the input is a ReLU output, standardized as NormProp does; "
                      "None: used as it is)")
        self.input_activation = input_activation
        self.in_features, self.out_features = in_features, out_features
        self.max_tracked_batch = max_tracked_batch
        self._init_fastnorm((out_features, in_features), bias, mode, renorm_every,
                            renorm_resets_norm, device, dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"FastNormLinear expected input of shape (*, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        checks.floating_point_input("FastNormLinear", x)

    def _map(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    @staticmethod
    def _per_output(values: torch.Tensor) -> torch.Tensor:
        return values

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._extra_repr_tail()}, "
                f"max_tracked_batch={self.max_tracked_batch}"
                + (f", input_activation={self.input_activation!r}"
                   if self.input_activation is not None else ""))


class _FastNormConv(ConvGeometry, _FastNorm):
    r"""Weight-normalized convolution in FastNorm's hybrid mode.

    .. math::
        z_c = \gamma_c \, \frac{W_c \star x}{\|W_c\|} + \beta_c

    As the FastNorm paper prescribes for convolutions (its section 4): the
    kernel norms are computed once per step, after the update (one pass over
    the kernel, not one per forward), and applied as a per-output-channel
    scale on the output; the kernel itself is never rescaled. `weight.grad`
    holds the gradient of the logical kernel W = diag(s) V. Train it with
    :class:`FastNormSGD`. The dense mode is eager torch in every dimension (the
    compiled kernels serve FastNormLinear's fused mode only).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias: as the torch convolution; numeric zero padding only
            (padding_mode ``"zeros"``).
        mode: ``"dense"``, the only mode for convolutions (accepted so that one
            set of keywords converts a whole CNN).
        renorm_every, renorm_resets_norm: as :class:`FastNormLinear`.
        device, dtype: as torch.nn modules.

    Shape:
        - Input: :math:`(N, C_{in}, *positions)`; Output: :math:`(N, C_{out}, *positions')`.

    Example:
        >>> conv = FastNormConv2d(3, 16, 3, padding=1)
        >>> optimizer = normlab.FastNormSGD(conv.parameters(), lr=0.05)
        >>> conv(torch.randn(8, 3, 32, 32)).square().mean().backward()
        >>> optimizer.step()
    """

    _modes = ("dense",)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 mode: str = "dense", renorm_every: int | None = DEFAULT_RENORM_EVERY,
                 renorm_resets_norm: bool = False, input_activation: None = None, device=None,
                 dtype=None):
        super().__init__()
        if input_activation is not None:
            # Standardizing x explicitly would also shift the zero padding; NormProp's
            # fold into the bias would need each kernel's sum every step.
            name = type(self).__name__
            raise ValueError(f"{name}: input_activation must be None (NormProp's input "
                             "standardization exists for FastNormLinear; for convolutions "
                             f"use {name.replace('FastNorm', 'NormProp')}), got "
                             f"{input_activation!r}")
        weight_shape = self._init_geometry(in_channels, out_channels, kernel_size, stride,
                                           padding, dilation, groups, padding_mode,
                                           padding_modes=("zeros",))
        self._init_fastnorm(weight_shape, bias, mode, renorm_every, renorm_resets_norm,
                            device, dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_conv_input(x)

    def _map(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv(x, weight)

    def _per_output(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *[1] * self.spatial_dims())

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, bias={self.bias is not None}, "
                f"{self._extra_repr_tail()}")


class FastNormConv1d(_FastNormConv):
    __doc__ = _FastNormConv.__doc__.replace("convolution", "1-D convolution", 1)
    plain_type = nn.Conv1d


class FastNormConv2d(_FastNormConv):
    __doc__ = _FastNormConv.__doc__.replace("convolution", "2-D convolution", 1)
    plain_type = nn.Conv2d


class FastNormConv3d(_FastNormConv):
    __doc__ = _FastNormConv.__doc__.replace("convolution", "3-D convolution", 1)
    plain_type = nn.Conv3d
