"""fold(): an inference copy of a model made of plain torch layers.

Two rewrites, on an evaluation-mode copy:

1. Every weight normalizer (a :class:`~normlab.layers._base.WeightNormalizedLayer`)
   becomes, through its ``to_plain()``, the ``nn.Linear`` / ``nn.ConvNd`` that
   computes its evaluation-mode function.
2. Every activation normalizer whose evaluation-mode function is a per-channel
   affine map (torch's BatchNorm with running statistics, and each module whose
   ``eval_affine_form()`` gives one: Batch Renormalization, Online Normalization
   with ``ecm="ac"`` or None) is folded into the plain ``nn.Linear`` /
   ``nn.Conv1d/2d/3d`` that feeds it, wherever that layer's output goes to the
   normalizer alone. With running statistics that map is

       y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,

   so the layer's kernel rows scale by s = weight / sqrt(running_var + eps)
   and its bias becomes (bias - running_mean) s + weight's shift.

Who feeds whom is read from the model's ``forward`` traced by ``torch.fx``, so a
normalizer called from a residual block's ``forward`` folds as one in an
``nn.Sequential`` does. The model keeps its own classes: fold changes its modules,
not its ``forward``. A folded normalizer leaves an ``nn.Sequential`` (the other
children keep their names) and becomes an ``nn.Identity`` elsewhere; what its form
keeps after the map takes its place instead (Online Normalization's "ac" clamp, as
an ``nn.Hardtanh``). A model ``torch.fx`` cannot trace (control flow on the
values or shapes of tensors, for instance) is folded inside each of its
submodules that can be traced (an ``nn.Sequential`` always can, unless a child
cannot), with a warning naming what could not be traced.

Anything else stays as it is, in evaluation mode: a normalizer after another kind of
module, or after a layer whose output has other users (or that is called more than
once, or has hooks, or whose parameters ``forward`` reads directly, or is held by
two parent modules or twice by one; a block reachable by several paths, as MONAI's
DynUNet keeps its blocks, still folds), batch statistics
(``track_running_stats=False``), Online Normalization's "ls" compensation (it
divides each sample by its own second moment). A Linear followed by a 1d normalizer
folds on the assumption of (N, C) inputs: the normalizer's channel dim is the
Linear's output features.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn

from .distributed import GlobalBatchNorm
from .layers._base import ActivationNorm, AffineForm, WeightNormalizedLayer, running_stats_affine
from .module_kinds import forward_owner

# the layers an affine map folds into (exact types: a subclass may compute otherwise)
FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the owners of a batch norm forward that, in evaluation mode, is torch's with running
# statistics
_BATCH_NORM_FORWARDS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, GlobalBatchNorm)


def fold(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """An evaluation-mode copy of `model` computing its evaluation-mode function with plain
    torch layers (module docstring: what is folded, and where). The copy is a module of
    `model`'s own class, its forward unchanged.

    Args:
        model: left unchanged.
        example_input: needed only by layers whose plain form depends on
            their input size (an EquiNormConv2d that changes the spatial
            size); one forward pass records each layer's input size, and
            the copy is exact at those sizes.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded = normlab.fold(model)
        >>> folded
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (2): ReLU()
        )
    """
    model = copy.deepcopy(model).eval()
    input_sizes = _input_sizes(model, example_input) if example_input is not None else {}
    _to_plain(model, input_sizes)
    untraceable: list[str] = []
    for _, module, graph in traced(model, _foldable_norm, untraceable):
        for layer_name, norm_name, form in _foldable_pairs(module, graph):
            _fold_into(module.get_submodule(layer_name), form)
            _remove(module, norm_name, form.after)
    if untraceable:
        warnings.warn(f"fold: torch.fx cannot trace {'; '.join(untraceable)}; the normalizers "
                      f"were folded inside the submodules it can trace", stacklevel=2)
    return model


def _input_sizes(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, tuple]:
    """The spatial size (H, W) of the input of each layer whose plain form needs it, on
    `example_input`."""
    sizes = {}

    def record(module, args):
        sizes[module] = tuple(args[0].shape[2:])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, WeightNormalizedLayer) and m.plain_form_needs_input_size]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _to_plain(parent: nn.Module, input_sizes: dict) -> None:
    for name, child in parent.named_children():
        if isinstance(child, WeightNormalizedLayer):
            setattr(parent, name, child.to_plain(input_sizes.get(child)).eval())
        else:
            _to_plain(child, input_sizes)


def _foldable_norm(module: nn.Module) -> bool:
    """Whether `module` is a normalizer that answers `_eval_affine_form`: normlab's (its own
    answer) or one with torch's batch norm forward."""
    return isinstance(module, ActivationNorm) or (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and forward_owner(type(module)) in _BATCH_NORM_FORWARDS)


def _eval_affine_form(norm: nn.Module) -> AffineForm | None:
    """`norm`'s evaluation-mode function as a per-channel affine map, or None when it is not
    one (or not a `_foldable_norm`): normlab's own answer first, then torch's BatchNorm
    contract."""
    if not _foldable_norm(norm):
        return None
    return norm.eval_affine_form() if isinstance(norm, ActivationNorm) else \
        running_stats_affine(norm)


class _Tracer(fx.Tracer):
    """torch's modules and every normalizer (a subclass's own too) stay single calls in the
    graph."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (ActivationNorm, nn.modules.batchnorm._NormBase)) or \
            super().is_leaf_module(module, qualified_name)


def traced(module: nn.Module, wanted: Callable[[nn.Module], bool], untraceable: list[str],
           path: str = "") -> Iterator[tuple[str, nn.Module, fx.Graph]]:
    """(path, submodule, its forward traced by torch.fx) for `module` or, where it cannot be
    traced, for its children in turn (each named with the reason in `untraceable`), as far
    down as a submodule holds a module that `wanted` accepts. Normalizers stay single calls
    in the graphs. What fold and convert read to know who feeds whom (`feeds`); changing a
    submodule's children between two steps of the walk is safe."""
    if not any(wanted(m) for m in list(module.modules())[1:]):
        return  # nothing wanted inside
    attributes = set(vars(module))
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # tracing runs arbitrary forward code: any error means "cannot"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        untraceable.append(f"{path.rstrip('.') or 'the model'} ({type(module).__name__}: "
                           f"{type(error).__name__}: {reason})")
        graph = None
    finally:  # the tracer keeps the tensor constants of forward as attributes of `module`
        for name in set(vars(module)) - attributes:
            delattr(module, name)
    if graph is not None:
        yield path, module, graph
        return
    for name, child in module.named_children():
        yield from traced(child, wanted, untraceable, f"{path}{name}.")


def feeds(root: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(source, consumer): the qualified names in `root` of each module call in `graph`
    whose only input is a call of module `source` with no other user, both modules called
    once, held by one parent, without hooks, and their attributes read nowhere else in the
    graph: the pairs where replacing either module changes that one step alone."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    attributes_read = [node.target for node in graph.nodes if node.op == "get_attr"]
    # A module held by several parents (or twice by one) may be called where the graph does
    # not show it; one held once, under a parent reachable by several paths (MONAI's DynUNet
    # keeps its blocks in a chain of skip layers too), is one call site, and setattr on its
    # parent changes it on every path.
    holders = Counter(id(child) for parent in root.modules() for child in parent._modules.values()
                      if child is not None)

    def called_once_alone(name: str) -> bool:
        module = root.get_submodule(name)
        return calls[name] == 1 and holders[id(module)] == 1 and \
            not (module._forward_hooks or module._forward_pre_hooks) and \
            not any(read.startswith(name + ".") for read in attributes_read)

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and len(source.users) == 1 and called_once_alone(source.target)
                and called_once_alone(node.target)):
            pairs.append((source.target, node.target))
    return pairs


def _foldable_pairs(root: nn.Module, graph: fx.Graph) -> list[tuple[str, str, AffineForm]]:
    """(layer, normalizer, the normalizer's form) of each of `feeds` where a foldable layer
    feeds a normalizer whose evaluation-mode function is a per-channel affine map."""
    pairs = []
    for layer_name, norm_name in feeds(root, graph):
        layer, norm = root.get_submodule(layer_name), root.get_submodule(norm_name)
        form = _eval_affine_form(norm) if type(layer) in FOLDABLE_LAYERS else None
        if form is not None and form.scale.numel() == layer.weight.shape[0]:
            pairs.append((layer_name, norm_name, form))
    return pairs


def _remove(root: nn.Module, name: str, after: nn.Module | None) -> None:
    """The module `name` of `root` out of the computation: `after` in its place; with no
    `after`, out of a Sequential that runs its children in order, an nn.Identity elsewhere."""
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    if after is None and isinstance(parent, nn.Sequential) and \
            forward_owner(type(parent)) is nn.Sequential:
        del parent._modules[child_name]
    else:
        setattr(parent, child_name, after if after is not None else nn.Identity())


@torch.no_grad()
def _fold_into(layer: nn.Module, form: AffineForm) -> None:
    """layer <- (x -> x * form.scale + form.shift) o layer; computed in float64."""
    weight = layer.weight.double()
    bias = (layer.bias.double() if layer.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    per_unit = (-1,) + (1,) * (weight.dim() - 1)
    layer.weight.copy_(weight * form.scale.view(per_unit))
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_empty(weight.shape[0]))
    layer.bias.copy_(bias * form.scale + form.shift)
