"""FastNorm (seed 000): weight normalization with norms tracked, not computed.

`FastNormLinear` keeps its weight W unnormalized and a buffer t with
t_i = 1 / ||W_i||; `FastNormSGD` updates t after each SGD step from the
low-rank structure of the update instead of recomputing ||W_i|| (O(mn)).
They are one mechanism: the layer records what the optimizer needs.

Minibatch generalization (seed 000 section 4 leaves it open). With
a_bi = gain_i t_i delta_bi the true weight-normalization gradient of row i is
grad_i = sum_b a_bi (h_b - t_i^2 p_bi W_i), p_bi = W_i . h_b, orthogonal to W_i, so

    ||grad_i||^2 = a_i^T K a_i - t_i^2 (a_i . p_i)^2,   K = H H^T (B x B),
    ||W_i'||^2  = (1 - lr wd)^2 ||W_i||^2 + lr^2 ||grad_i||^2,

O(B^2 (n + m)) instead of O(mn), with a_i . p_i = sum_b delta_bi (z_bi - bias_i)
read off the forward output. Above `max_tracked_batch` rows, with momentum
(which breaks the orthogonality), or when the recorded samples do not
explain the accumulated gradient, the step falls back to the seed's hybrid
mode: ||W_i'|| computed explicitly, W left unscaled.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..functional import weight_normalized_linear

# Measured with `normlab bench --case fastnorm_crossover` (784 -> 1024 layer):
# over two runs the tracked update cost 0.79-0.90x an explicit norm pass at
# batch 16 and 1.25-1.76x at 32, so the hybrid mode takes over above 16.
DEFAULT_MAX_TRACKED_BATCH = 16
# Measured with tools/fastnorm_drift.py (seed MLP, batch 16, lr 0.05): the
# tracked norms drift from the explicit ones by 1.7e-5 (relative, max over
# rows) in 1000 float32 steps and by 1.7e-2 / 2.3e-2 in 500 / 1000 bfloat16
# steps (rounding of the bfloat16 weight update; t itself is kept in float32).
# Renormalizing every 500 steps keeps bfloat16 within RENORM_DRIFT_BOUND.
DEFAULT_RENORM_EVERY = 500
RENORM_DRIFT_BOUND = 0.05

# weight Parameter -> weakref to its FastNormLinear: how FastNormSGD, which
# sees only parameters, finds the layers among them.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _TrackedInverseNorm(torch.autograd.Function):
    """Forward: the tracked t (no O(mn) work). Backward: d(1/||W_i||)/dW_i = -t_i^3 W_i.

    Through it autograd gives W the exact weight-normalization gradient,
    gain t delta^T h minus its projection on each row.
    """

    @staticmethod
    def forward(ctx, weight, inv_norm):
        ctx.save_for_backward(weight, inv_norm)
        return inv_norm.clone()

    @staticmethod
    def backward(ctx, grad):
        weight, inv_norm = ctx.saved_tensors
        return -(grad * inv_norm.pow(3)).unsqueeze(1).to(weight.dtype) * weight, None


class _Record:
    """One training forward: its inputs, pre-bias outputs and (after backward) output grads."""

    __slots__ = ("inputs", "outputs", "output_grads")

    def __init__(self, inputs: torch.Tensor, outputs: torch.Tensor):
        self.inputs, self.outputs, self.output_grads = inputs, outputs, None

    def capture(self, grad: torch.Tensor) -> None:
        grad = grad.detach().reshape(-1, grad.shape[-1])
        self.output_grads = grad if self.output_grads is None else self.output_grads + grad


def tracked_sq_norms(sq_norms: torch.Tensor, inv_norm: torch.Tensor, gain: torch.Tensor,
                     inputs: torch.Tensor, outputs: torch.Tensor, output_grads: torch.Tensor,
                     lr: float, weight_decay: float) -> torch.Tensor:
    """||W_i'||^2 after W' = (1 - lr wd) W - lr grad, from the B samples alone.

    `inputs` (B, n) are the h_b, `outputs` (B, m) the z_bi - bias_i and
    `output_grads` (B, m) the delta_bi. Costs O(B^2 (n + m)).
    """
    gram = inputs @ inputs.T
    a = output_grads * (gain * inv_norm)
    a_gram_a = ((gram @ a) * a).sum(0)
    a_dot_p = (output_grads * outputs).sum(0)
    grad_sq = (a_gram_a - (inv_norm * a_dot_p) ** 2).clamp_min(0)  # rounding can go below 0
    return (1 - lr * weight_decay) ** 2 * sq_norms + lr**2 * grad_sq


class FastNormLinear(nn.Module):
    r"""Weight-normalized linear layer with tracked row norms (FastNorm, seed 000).

    .. math::
        z_i = \gamma_i \, t_i \, (W_i \cdot h) + \beta_i, \qquad t_i = 1 / \|W_i\|

    the function of explicit weight normalization, but t is tracked by
    :class:`FastNormSGD` from the low-rank SGD update (seed 000 eqs. 5-7)
    instead of recomputed. Backward gives W the true weight-normalization
    gradient (eq. 2, orthogonal to each row) and the input
    :math:`W^T (t \odot \gamma \odot \delta)` (eq. 7). Every `renorm_every`
    optimizer steps (and on :meth:`renormalize`) the rows of W are normalized
    and t reset to 1 so that t stays representable and its drift bounded.
    t is kept in float32 when the weights are bfloat16 or float16.

    Train it with :class:`FastNormSGD`: any other optimizer changes W without
    updating t, which the next forward detects and reports.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        renorm_every: optimizer steps between explicit renormalizations
            (None: never). Default from the measured drift (module docstring).
        max_tracked_batch: above this many recorded samples per step the norms
            are computed explicitly (hybrid mode); default the measured crossover.

    Shape:
        - Input: :math:`(*, H_{in})`; Output: :math:`(*, H_{out})`.

    Example:
        >>> layer = FastNormLinear(784, 1024)
        >>> optimizer = FastNormSGD(layer.parameters(), lr=0.05)
        >>> layer(torch.randn(16, 784)).square().mean().backward()
        >>> optimizer.step()
        >>> torch.allclose(layer.tracked_norms(), layer.explicit_norms())
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 renorm_every: int | None = DEFAULT_RENORM_EVERY,
                 max_tracked_batch: int = DEFAULT_MAX_TRACKED_BATCH,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("max_tracked_batch", max_tracked_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if renorm_every is not None and (not isinstance(renorm_every, int) or renorm_every < 1):
            raise ValueError(f"renorm_every must be a positive int or None, got {renorm_every!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.renorm_every, self.max_tracked_batch = renorm_every, max_tracked_batch
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.gain = nn.Parameter(torch.empty(out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # t is kept in at least float32 (see _apply)
        self.register_buffer("inv_norm", torch.ones(
            out_features, device=device,
            dtype=torch.promote_types(self.weight.dtype, torch.float32)))
        self.register_buffer("steps_since_renorm", torch.zeros((), dtype=torch.long))
        self._records: list[_Record] = []
        self._overflow = False  # more samples than max_tracked_batch since the last step
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The function of a freshly initialized nn.Linear, with unit-norm rows."""
        reference = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                              dtype=self.weight.dtype)
        self._load_linear(reference.weight, reference.bias)

    @classmethod
    def from_module(cls, module: nn.Linear, **kw) -> FastNormLinear:
        """A FastNormLinear computing the same function as `module`."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"from_module expects an nn.Linear, got {type(module).__name__}")
        layer = cls(module.in_features, module.out_features, module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype, **kw)
        layer._load_linear(module.weight, module.bias)
        return layer

    @torch.no_grad()
    def _load_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # gain_i = ||W_i||, rows stored normalized; a zero row gets gain 0 and
        # an arbitrary unit row (the function, 0, is kept; no 0/0).
        norms = weight.norm(dim=1)
        unit = torch.full_like(weight, 1 / math.sqrt(self.in_features))
        self.weight.copy_(torch.where(norms[:, None] > 0,
                                      weight / norms.clamp_min(1e-30)[:, None], unit))
        self.gain.copy_(norms)
        if bias is not None:
            self.bias.copy_(bias)
        self.inv_norm.fill_(1)
        self._sync()

    def _sync(self) -> None:
        """Declare W and t consistent as they are now."""
        self.steps_since_renorm.zero_()
        self._records.clear()
        self._overflow = False
        self._mark_synced()

    def _mark_synced(self) -> None:
        # The identity tells a new Parameter (deepcopy) from an in-place change.
        self._synced_weight = (id(self.weight), self.weight._version)
        _OWNERS[self.weight] = weakref.ref(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"FastNormLinear expected input of shape (*, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"FastNormLinear expected a floating-point input, got {x.dtype}")
        if self._synced_weight[0] != id(self.weight):
            self._mark_synced()
        elif self._synced_weight[1] != self.weight._version:
            raise RuntimeError(
                "FastNormLinear: the weight was changed outside FastNormSGD (for example by "
                "torch.optim.SGD or an in-place edit), so the tracked norms are stale. Train "
                "it with normlab.FastNormSGD; after editing the weight on purpose, call "
                "renormalize().")
        inv_norm = _TrackedInverseNorm.apply(self.weight, self.inv_norm.to(self.weight.dtype))
        z = weight_normalized_linear(x, self.weight, self.gain, inv_norm, self.bias)
        if self.training and z.requires_grad:
            self._record(x, z)
        return z

    def _record(self, x: torch.Tensor, z: torch.Tensor) -> None:
        if self.weight.grad is None:  # zeroed since: finished backwards explain nothing now
            self._records = [r for r in self._records if r.output_grads is None]
        rows = sum(len(r.inputs) for r in self._records) + x.numel() // self.in_features
        if rows > self.max_tracked_batch:  # the step will use the hybrid mode: keep nothing
            self._overflow = True
            self._records.clear()
            return
        with torch.no_grad():
            pre_bias = z if self.bias is None else z - self.bias
        record = _Record(x.detach().reshape(-1, self.in_features),
                         pre_bias.reshape(-1, self.out_features))
        z.register_hook(record.capture)
        self._records.append(record)

    def tracked_norms(self) -> torch.Tensor:
        """1 / t: the row norms as tracked."""
        return self.inv_norm.reciprocal()

    @torch.no_grad()
    def explicit_norms(self) -> torch.Tensor:
        """||W_i||, computed (O(mn)) in the dtype of t."""
        return torch.linalg.vector_norm(self.weight, dim=1, dtype=self.inv_norm.dtype)

    @torch.no_grad()
    def renormalize(self) -> None:
        """Normalize the rows of W and reset t to 1; the function is unchanged."""
        norms = self.explicit_norms()
        self.weight.div_(norms.clamp_min(torch.finfo(norms.dtype).tiny)[:, None])
        self.inv_norm.fill_(1)
        self._sync()

    def _planned_sq_norms(self, lr: float, weight_decay: float, momentum: float):
        """||W_i'||^2 from the recorded samples, or None where the hybrid mode must compute it."""
        records = [r for r in self._records if r.output_grads is not None]
        if momentum or self._overflow or not records or self.gain.grad is None:
            return None
        compute = torch.promote_types(self.inv_norm.dtype, torch.float32)
        inputs, outputs, grads = (torch.cat([getattr(r, f) for r in records]).to(compute)
                                  for f in ("inputs", "outputs", "output_grads"))
        inv_norm, gain = self.inv_norm.to(compute), self.gain.detach().to(compute)
        # The samples must explain the accumulated gradient (a zero_grad we did
        # not see, a backward without records): gain_i * dL/dgain_i = a_i . p_i.
        # The tolerance covers rounding of z - bias and of the gain's gradient.
        a_dot_p = (grads * outputs).sum(0)
        bias = 0 if self.bias is None else self.bias.detach().to(compute).abs()
        tolerance = (grads.abs() * (outputs.abs() + bias)).sum(0)
        tolerance *= math.sqrt(torch.finfo(self.gain.grad.dtype).eps)
        if ((gain * self.gain.grad.to(compute) - a_dot_p).abs() > tolerance).any():
            return None
        return tracked_sq_norms(inv_norm.pow(-2), inv_norm, gain, inputs, outputs, grads,
                                lr, weight_decay)

    @torch.no_grad()
    def _finish_step(self, sq_norms: torch.Tensor | None) -> None:
        """After the SGD update: set t (tracked or explicit), renormalize when due."""
        if sq_norms is None:
            sq_norms = self.explicit_norms().square()
        self.inv_norm.copy_(sq_norms.clamp_min(torch.finfo(sq_norms.dtype).tiny).rsqrt())
        steps = int(self.steps_since_renorm) + 1
        if self.renorm_every is not None and steps >= self.renorm_every:
            self.renormalize()
            return
        self._sync()
        self.steps_since_renorm.fill_(steps)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # t stays at least float32: in bfloat16 the per-step increments of the
        # tracked norms fall below its resolution and the tracking stalls.
        if self.inv_norm.dtype.itemsize < 4:
            self.inv_norm = self.inv_norm.float()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        steps = int(self.steps_since_renorm)
        self._sync()
        self.steps_since_renorm.fill_(steps)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, renorm_every={self.renorm_every}, "
                f"max_tracked_batch={self.max_tracked_batch}")


class FastNormSGD(torch.optim.SGD):
    """SGD that keeps the tracked norms of the FastNormLinear layers among `params`.

    Plain :class:`torch.optim.SGD` for every parameter; after the update each
    FastNormLinear's t is set from the low-rank formula (module docstring),
    or explicitly (hybrid mode) with momentum or large batches. Momentum
    therefore costs one O(mn) norm pass per layer and step.

    Example:
        >>> model = normlab.convert(nn.Sequential(nn.Linear(784, 10)), "fastnorm")
        >>> optimizer = FastNormSGD(model.parameters(), lr=0.05, weight_decay=1e-4)
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FastNormSGD: {name} must be a finite number, got {value!r}")
        if lr <= 0:
            raise ValueError(f"FastNormSGD: lr must be > 0, got {lr}")
        if weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"FastNormSGD: expected weight_decay >= 0 and 0 <= momentum < 1, "
                             f"got {weight_decay} and {momentum}")
        if lr * weight_decay >= 1:
            raise ValueError(f"FastNormSGD: lr * weight_decay must be < 1 (each step scales "
                             f"the weights by 1 - lr * weight_decay), got {lr * weight_decay}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def add_param_group(self, param_group: dict) -> None:
        unsupported = {k: param_group[k] for k in ("nesterov", "dampening", "maximize")
                       if param_group.get(k)}
        if unsupported:
            raise ValueError(f"FastNormSGD cannot track norms with {unsupported}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        for group in self.param_groups:
            for param in group["params"]:
                owner = _OWNERS.get(param)
                layer = owner() if owner is not None else None
                if layer is not None and param.grad is not None:
                    plans.append((layer, layer._planned_sq_norms(
                        group["lr"], group["weight_decay"], group["momentum"])))
        super().step()
        for layer, sq_norms in plans:
            layer._finish_step(sq_norms)
        return loss
