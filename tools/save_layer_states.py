"""Save the state dicts of normlab's layers, and their evaluation-mode outputs, so that a
test can check that checkpoints saved by this version still load (and compute the same)
after the layers change.

    PYTHONPATH=src python tools/save_layer_states.py tests/fixtures/layer_states.pt --add-missing

(--add-missing keeps the states saved by earlier versions, which are the point, and adds
the layers that are new.)

Each entry names the class (an attribute of `normlab`, or of `normlab.distributed`), its
constructor arguments and an input shape; the file holds only tensors, strings and
numbers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse

import torch

LINEAR = ((6, 5), (4, 6))  # (in, out) features; an input of 4 samples
CONV = ((3, 4, 3), 3)  # (in, out, kernel) channels; 3 channels of 5 positions per spatial dim
CHANNELS = 3


def entry_spec(cls: type) -> tuple[tuple, dict, tuple]:
    """(args, kwargs, input shape) for a layer class, from what it declares: its `plain_type`
    (Linear, Conv1d/2d/3d) for a weight normalizer, its `dim` for an activation normalizer."""
    from torch import nn

    plain = getattr(cls, "plain_type", None)
    if plain is nn.Linear:
        return LINEAR[0], {}, LINEAR[1]
    if plain is not None:
        spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[plain]
        return CONV[0], {"padding": 1}, (2, CONV[1]) + (5,) * spatial
    dim = getattr(cls, "dim", 2)  # the synced BatchNorm takes any (N, C, ...); saved as 2-D
    if dim == 1:
        return (CHANNELS,), {}, (4, CHANNELS)
    return (CHANNELS,), {}, (2, CHANNELS) + (4,) * dim


def public_layers() -> list[str]:
    """Every public layer of normlab (the registered methods' nn.Modules) and the synced
    BatchNorm of normlab.distributed."""
    import normlab

    return [cls.__name__ for cls in normlab.public_classes()
            if issubclass(cls, torch.nn.Module)] + ["SyncBatchNorm"]


def layer_class(name: str) -> type:
    import normlab
    import normlab.distributed

    return getattr(normlab, name, None) or getattr(normlab.distributed, name)


@torch.no_grad()
def randomized(layer: torch.nn.Module) -> torch.nn.Module:
    """Every per-unit parameter and buffer (gains, biases, affines, running statistics) moved
    away from its initial value, positive so that variances stay valid, deterministically;
    the weights keep their initialization (FastNorm tracks its weight's norms)."""
    generator = torch.Generator().manual_seed(0)
    for tensor in (*layer.parameters(), *layer.buffers()):
        if tensor.is_floating_point() and tensor.dim() == 1:
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--add-missing", action="store_true",
                        help="keep the entries already in OUT (saved by an earlier version) and "
                             "add the public layers it lacks")
    args = parser.parse_args()
    entries = torch.load(args.out, weights_only=True) if args.add_missing else []
    saved = {entry["class"] for entry in entries}
    for name in public_layers():
        if name in saved:
            continue
        layer_args, kwargs, input_shape = entry_spec(layer_class(name))
        torch.manual_seed(0)
        layer = randomized(layer_class(name)(*layer_args, **kwargs)).eval()
        x = torch.rand(input_shape, generator=torch.Generator().manual_seed(1))
        entries.append({"class": name, "args": list(layer_args), "kwargs": kwargs,
                        "input": x, "output": layer(x).detach(),
                        "state": layer.state_dict()})
    torch.save(entries, args.out)


if __name__ == "__main__":
    main()
