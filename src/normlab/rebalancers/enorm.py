"""ENorm: Equi-normalization (Stock et al. 2019), run beside an optimizer.

ReLU networks are invariant to rescaling a hidden unit: multiplying row i of
W_k (the unit's incoming weights and its bias) by d_i > 0 and column i of
W_{k+1} (its outgoing weights) by 1/d_i leaves the function unchanged. One
ENorm cycle walks the consecutive pairs (k, k+1) of each chain of layers and
picks, for every unit at once,

    d_i = sqrt( ||col_i(W_{k+1})||_p / (c * ||row_i(W_k)||_p) ),

which with c = 1 minimizes ||D W_k||_p^p + ||W_{k+1} D^-1||_p^p over D: a
cycle is block-coordinate descent on the p-norm of the weights, decreasing
monotonically to its unique minimizer. c > 1 shifts weight towards the
outputs (the reproduction of Stock et al. 2019, arXiv:1902.10416, in the
anonymous ICLR 2019 reproducibility report, uses c = 1.2).

The pairs are read from the model's torch.fx graph (`_find_chains`). A cycle
needs only the sums of |w|^p per (unit, input unit): the row norms of W_k
after the previous pair's column scaling s are (|W_k|^p) s^p, so each weight
is scaled once per cycle, by d (rows) and s (columns) together.

Two schedules. ``"paper"`` is Algorithm 1 of Stock et al.: every pair of a
chain, in order, each reading the row norms of W_k after the previous pair
has scaled its columns. ``"official"`` is the authors' code
(facebookresearch/enorm): the last pair of each chain (the last hidden layer
and the classifier) is left alone, and every d is computed from the norms as
they were at the start of the cycle (the code reads W_k's row norms before
applying the previous pair's column scaling).

On the CPU a cycle runs as one compiled call per chain (csrc/enorm.cpp, built by
normlab._ext.loader, on torch's threads) where `ENorm._kernel` says it applies; the
eager torch code of `ENorm._balance` is its specification and runs everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from .._ext import loader as _native
from .._ext.loader import tracing as _tracing

_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Identity)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_ELEMENTWISE_FUNCTIONS = (torch.relu, F.relu, F.leaky_relu, F.dropout)
_POOL_FUNCTIONS = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
BATCHNORM_MODES = ("official", "affine")
SCHEDULES = ("paper", "official")
# The norms the compiled cycle takes: |w|^p is written out as products (other p take the
# eager path, whose vectorized pow is ~8x faster than a scalar std::pow per weight).
KERNEL_POWERS = (1, 2, 3, 4)

# Optimizer state that ENorm rescales, as the power of the weight's factor:
# gradients scale by the inverse factor, so first moments do too, second
# moments by its square. Counters ("step") are left alone.
_STATE_POWERS = {
    torch.optim.SGD: {"momentum_buffer": -1},
    torch.optim.Adam: {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2},
    torch.optim.AdamW: {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2},
}


@dataclass
class _Layer:
    """A module whose output channels are units: Linear, Conv2d or (affine mode) BatchNorm."""

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    in_units: int = 1  # units of the previous layer of the chain (1 for a chain's head)

    def unit_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (shaped like the weight) as (units, in_units, rest)."""
        return tensor.view(tensor.shape[0], self.in_units, -1)


def _units(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.num_features


def _flatten_is_per_sample(start_dim: int = 1, end_dim: int = -1) -> bool:
    return start_dim == 1 and end_dim == -1


class _GraphWalk:
    """Finds the chains of layer pairs in a traced model (see `ENorm`)."""

    def __init__(self, model: nn.Module, batchnorm: str):
        try:
            self.graph = fx.symbolic_trace(model).graph
        except Exception as err:  # fx raises many types; all mean the same here
            raise ValueError(
                f"ENorm finds its layer pairs from the model's torch.fx graph, and "
                f"{type(model).__name__} cannot be traced: {type(err).__name__}: {err}"
            ) from err
        self.model = model
        self.batchnorm = batchnorm
        calls: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self.called_once = {name for name, n in calls.items() if n == 1}

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def is_head(self, node: fx.Node) -> bool:
        """Can `node`'s output channels be rescaled (the k of a pair)?"""
        module = self.module(node)
        if module is None or node.target not in self.called_once:
            return False
        if isinstance(module, nn.Linear):
            return True
        if isinstance(module, nn.Conv2d):
            return module.groups == 1
        return (self.batchnorm == "affine" and isinstance(module, _BATCHNORMS)
                and module.affine)

    def kind(self, node: fx.Node) -> str | None:
        """How `node` acts on the units flowing through it; None ends a chain."""
        module = self.module(node)
        if module is not None:
            if isinstance(module, _BATCHNORMS):  # affine mode: a head of its own chain
                return None if self.batchnorm == "affine" else "elementwise"
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                return "head"
            if isinstance(module, _ELEMENTWISE_MODULES):
                return "elementwise"
            if isinstance(module, _POOL_MODULES):
                return "pool"
            if isinstance(module, nn.Flatten):
                return "flatten" if _flatten_is_per_sample(module.start_dim,
                                                           module.end_dim) else None
            return None
        target = node.target
        if node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS \
                or node.op == "call_method" and target == "relu":
            return "elementwise"
        if node.op == "call_function" and target in _POOL_FUNCTIONS:
            return "pool"
        if node.op == "call_function" and target is torch.flatten \
                or node.op == "call_method" and target == "flatten":
            return "flatten" if _flatten_is_per_sample(*node.args[1:], **node.kwargs) else None
        return None

    def successor(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """The head reached from head `node` through homogeneous operations only,
        with the number of inputs per unit it sees; None when the chain ends."""
        head = self.module(node)
        channel_first = not isinstance(head, nn.Linear)  # Conv2d, BatchNorm: units on dim 1
        units, flattened = _units(head), False
        while True:
            if len(node.users) != 1:  # a branch (residual, two heads) ends the chain
                return None
            (user,) = node.users
            if user.all_input_nodes != [node] or user.args[0] is not node:
                return None
            kind = self.kind(user)
            if kind == "head":
                break
            if kind is None or kind == "pool" and (not channel_first or flattened):
                return None
            flattened = flattened or kind == "flatten"
            node = user
        if not self.is_head(user):
            return None
        nxt = self.module(user)
        if isinstance(nxt, nn.Conv2d):
            ok = channel_first and not flattened and nxt.in_channels == units
        elif channel_first and flattened:  # (N, C, ...) flattened channel-major
            ok = nxt.in_features % units == 0
        else:  # units on the last dim: a Linear head, or BatchNorm1d on (N, C)
            ok = nxt.in_features == units and (not channel_first
                                               or isinstance(head, nn.BatchNorm1d))
        return (user, units) if ok else None


def _find_chains(model: nn.Module, batchnorm: str = "official") -> list[list[_Layer]]:
    """The chains of consecutive balanceable layers of `model`, in graph order."""
    walk = _GraphWalk(model, batchnorm)
    nxt: dict[fx.Node, tuple[fx.Node, int]] = {}
    for node in walk.graph.nodes:
        if walk.is_head(node) and (found := walk.successor(node)) is not None:
            nxt[node] = found
    starts = [node for node in nxt if node not in {n for n, _ in nxt.values()}]
    chains = []
    for node in starts:
        chain = [_make_layer(walk, node, 1)]
        while node in nxt:
            node, in_units = nxt[node]
            chain.append(_make_layer(walk, node, in_units))
        chains.append(chain)
    return chains


def _make_layer(walk: _GraphWalk, node: fx.Node, in_units: int) -> _Layer:
    module = walk.module(node)
    if not module.weight.is_contiguous():
        raise ValueError(f"ENorm needs contiguous weights; {node.target}.weight is not "
                         f"(call .contiguous() on it, or use the default memory format)")
    return _Layer(node.target, module.weight, module.bias, in_units)


class ENorm:
    r"""Equi-normalization: rebalances a ReLU network's weights after each optimizer step.

    For each pair (k, k+1) of consecutive layers joined by positively
    homogeneous operations, one cycle (`step`) rescales every hidden unit i:

    .. math::
        d_i = \sqrt{\frac{\lVert \mathrm{col}_i(W_{k+1}) \rVert_p}
                         {c\,\lVert \mathrm{row}_i(W_k) \rVert_p}}, \qquad
        \mathrm{row}_i(W_k) \mathrel{*}= d_i, \quad b_{k,i} \mathrel{*}= d_i, \quad
        \mathrm{col}_i(W_{k+1}) \mathrel{*}= 1 / d_i,

    pair after pair along each chain. For a convolution a unit is an output
    channel; its row is its kernel, its column the next layer's kernel slice
    (or block of columns, after a flatten). The network's function is
    unchanged; with c = 1 each cycle decreases :math:`\sum \lVert W \rVert_p^p`.

    Pairs come from the torch.fx graph: a Linear/Conv2d whose output reaches
    the next Linear/Conv2d only through ReLU, LeakyReLU, max/average pooling,
    Flatten, Dropout or Identity (modules, or relu/flatten/pooling functions)
    forms a pair. Anything else ends a chain: a branch (residual addition),
    another operation, a grouped convolution, a module called twice.

    Args:
        model: the network; its parameters are rescaled in place.
        optimizer: if given, its per-parameter state is rescaled with the
            weights: SGD momentum by the inverse factor, Adam/AdamW first
            moments by the inverse factor and second moments by its square.
            Other optimizers with per-parameter state raise ValueError.
        c: the asymmetric scaling factor (> 0); c > 1 penalizes depth.
        p: the norm (> 0).
        balance_bias: count each unit's bias in its row norm (the bias is
            rescaled with its row either way, so the function is kept).
        batchnorm: ``"official"`` balances Linear/Conv2d weights across a
            BatchNorm as if it were absent (the official implementation and
            the reproducibility report's ENorm+BN runs); BatchNorm undoes the row scaling, so
            the network's function then changes. ``"affine"`` keeps the
            function: BatchNorm's (weight, bias) become the unit's row and the
            layer before the BatchNorm is left alone.
        schedule: ``"paper"`` (Algorithm 1: every pair, each reading the row
            norms after the previous pair's column scaling) or ``"official"``
            (the authors' code: the last pair of each chain is skipped, and the
            row norms are read before the previous pair's column scaling). The
            official code also leaves biases and, for fully-connected networks,
            SGD momentum unscaled; here both schedules rescale them alike.

    Attributes:
        pairs: the balanced pairs, as (name of layer k, name of layer k+1).

    Dead units (a zero row or column) are left unscaled: no NaN or Inf.
    The rescaled optimizer state is the state that training in the rescaled
    weights would hold (the next gradient scales by the inverse factor too),
    so it stays consistent step after step. The next step itself is not
    function-equivalent to the unrescaled run's: gradient descent is not
    invariant to the rescaling (that is why ENorm helps). Weight decay and
    Adam's eps are not rescaled either.

    Example:
        >>> model = normlab.models.fc_cifar(p=3)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        >>> enorm = normlab.ENorm(model, optimizer, c=1.2)
        >>> x, y = torch.randn(8, 3072), torch.randint(0, 10, (8,))
        >>> nn.functional.cross_entropy(model(x), y).backward()
        >>> optimizer.step(); enorm.step()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 c: float = 1.0, p: float = 2, balance_bias: bool = False,
                 batchnorm: str = "official", schedule: str = "paper"):
        if not c > 0:
            raise ValueError(f"c must be > 0, got {c!r}")
        if not 0 < p < float("inf"):
            raise ValueError(f"p must be a positive finite number, got {p!r}")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.optimizer, self.c, self.p = optimizer, float(c), float(p)
        self.balance_bias, self.batchnorm, self.schedule = balance_bias, batchnorm, schedule
        self._chains = _find_chains(model, batchnorm)
        if not self._chains:
            raise ValueError(
                f"ENorm found no pair of layers to balance in {type(model).__name__}: it needs "
                f"a Linear/Conv2d whose output reaches another only through ReLU, LeakyReLU, "
                f"pooling, Flatten, Dropout or Identity")
        # pairs of a chain left alone at its end: none (paper) or the last one (official)
        self._skipped = {"paper": 0, "official": 1}[schedule]
        self._chains = [chain for chain in self._chains if len(chain) > 1 + self._skipped]
        if not self._chains:
            raise ValueError(f"ENorm(schedule='official') leaves the last pair of each chain "
                             f"alone, and every chain of {type(model).__name__} has one pair "
                             f"only (one hidden layer): nothing to balance")
        self.pairs = [(a.name, b.name) for chain in self._chains
                      for a, b in zip(chain[:-1 - self._skipped], chain[1:])]
        self._state_powers = self._check_optimizer()
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"ENorm(c={self.c}, p={self.p:g}, balance_bias={self.balance_bias}, "
                f"batchnorm={self.batchnorm!r}, schedule={self.schedule!r}, "
                f"pairs={len(self.pairs)})")

    def _check_optimizer(self) -> dict[str, int]:
        """The rescaling powers of the optimizer's state; ValueError if it has unknown state."""
        if self.optimizer is None:
            return {}
        powers = next((table for kind, table in _STATE_POWERS.items()
                       if type(self.optimizer) is kind), {})
        if not self.optimizer.state:  # e.g. SGD without momentum
            return powers
        for layer in (layer for chain in self._chains for layer in chain):
            for param in (layer.weight, layer.bias):
                state = self.optimizer.state.get(param, {})
                unknown = sorted(key for key, value in state.items() if key not in powers
                                 and isinstance(value, torch.Tensor)
                                 and value.shape == param.shape)
                if unknown:
                    raise ValueError(
                        f"ENorm cannot rescale the state {unknown} that "
                        f"{type(self.optimizer).__name__} keeps for {layer.name}; supported "
                        f"optimizers: SGD, Adam, AdamW (or pass optimizer=None)")
        return powers

    @torch.no_grad()
    def step(self) -> None:
        """One ENorm cycle over every chain (call it after `optimizer.step()`)."""
        self._check_optimizer()  # state appears lazily, at the optimizer's first step
        for chain in self._chains:
            self._balance(chain)

    def _buffer(self, slot: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor kept between cycles: a fresh weight-sized one costs page faults."""
        key = (slot, tuple(shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = like.new_empty(shape)
        return self._buffers[key]

    def _powered_sums(self, layer: _Layer, slot: str) -> torch.Tensor:
        """sum over kernel positions of |w|^p, as (units, in_units), in float32 at least."""
        weight = layer.unit_view(layer.weight)
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        if weight.shape[-1] > 1:  # a reduction without a |w|^p temporary as big as w
            return torch.linalg.vector_norm(weight, self.p, dim=-1).pow_(self.p)
        weight = weight.squeeze(-1)
        out = self._buffer(slot, weight.shape, weight)
        return torch.mul(weight, weight, out=out) if self.p == 2 else \
            torch.abs(weight, out=out).pow_(self.p)

    def _balance(self, chain: list[_Layer]) -> None:
        params = [param for layer in chain for param in (layer.weight, layer.bias)]
        states = [self._state(param) for param in params]  # weight, bias of each layer
        kernel = self._kernel(params, states)
        if kernel is not None:
            kernel.balance_chain(
                params[::2], params[1::2], [layer.in_units for layer in chain],
                [[tensor for tensor, _ in state] for state in states[::2]],
                [[power for _, power in state] for state in states[::2]],
                [[tensor for tensor, _ in state] for state in states[1::2]],
                [[power for _, power in state] for state in states[1::2]],
                len(chain) - 1 - self._skipped, self.p, self.c, self.balance_bias,
                self.schedule == "paper")
            return
        current = self._powered_sums(chain[0], "powered 0")
        in_scale = current.new_ones(1)  # the head's columns are not rescaled
        last = len(chain) - 1 - self._skipped  # the last layer whose columns are rescaled
        for k, (layer, nxt) in enumerate(zip(chain[:last], chain[1:])):
            following = self._powered_sums(nxt, f"powered {(k + 1) % 2}")
            # ||row_i||_p^p after the previous pair's column scaling (paper) or before it
            row = (torch.mv(current, in_scale.pow(self.p)) if self.schedule == "paper"
                   else current.sum(1))
            if self.balance_bias and layer.bias is not None:
                row += layer.bias.to(row.dtype).abs().pow_(self.p)
            col = following.sum(0)  # ||col_i||_p^p
            # d = sqrt(||col||_p / (c ||row||_p)); dead units (0, Inf, NaN) stay unscaled
            d = (col / row).pow_(0.5 / self.p).mul_(self.c ** -0.5)
            d = torch.where((d > 0) & (d < float("inf")), d, 1.0)
            self._rescale(layer, d, in_scale)
            in_scale, current = d.reciprocal(), following
        self._rescale(chain[last], None, in_scale)

    def _rescale(self, layer: _Layer, d: torch.Tensor | None, in_scale: torch.Tensor) -> None:
        """Rows times d (None: 1), columns times in_scale; the optimizer state alike."""
        factor = in_scale.view(1, -1, 1)
        if d is not None:
            out = self._buffer("factor", (len(d), len(in_scale), 1), d)
            factor = torch.mul(d.view(-1, 1, 1), factor, out=out)
        self._scale(layer.weight, factor, layer.unit_view)
        if d is not None and layer.bias is not None:
            self._scale(layer.bias, d, lambda t: t)

    def _state(self, param: torch.Tensor | None) -> list[tuple[torch.Tensor, int]]:
        """The optimizer's tensors for `param` that ENorm rescales, with their powers."""
        state = self.optimizer.state.get(param) if self.optimizer is not None else None
        if not state:
            return []
        return [(state[key], power) for key, power in self._state_powers.items()
                if isinstance(state.get(key), torch.Tensor)]

    def _scale(self, param: torch.Tensor, factor: torch.Tensor, view) -> None:
        view(param).mul_(factor.to(param.dtype))
        for tensor, power in self._state(param):
            view(tensor).mul_(factor.pow(power).to(tensor.dtype))

    def _kernel(self, params: list[torch.Tensor | None],
                states: list[list[tuple[torch.Tensor, int]]]):
        """The compiled cycle (csrc/enorm.cpp) where it applies, else None: p = 1, 2, 3 or 4,
        the parameters (None: no bias) and optimizer state on the CPU, all float32 or all
        float64, contiguous, not traced. It covers all else that the eager path does: chains
        of Linear, Conv2d and (affine mode) BatchNorm, flatten blocks, both schedules,
        balance_bias, dead units, the state of SGD, Adam and AdamW."""
        dtype = params[0].dtype
        if self.p not in KERNEL_POWERS or dtype not in (torch.float32, torch.float64) \
                or _tracing():
            return None
        tensors = [param for param in params if param is not None]
        tensors += [tensor for state in states for tensor, _ in state]
        if any(t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous()
               for t in tensors):
            return None
        return _native.module("enorm", openmp=True)
