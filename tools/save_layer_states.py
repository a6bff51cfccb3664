"""Save the state dicts of normlab's layers, and their evaluation-mode outputs, so that a
test can check that checkpoints saved by this version still load (and compute the same)
after the layers change.

    PYTHONPATH=src python tools/save_layer_states.py tests/fixtures/layer_states.pt

With ``--append``, the entries already in the file stay as they were saved and only the
classes it lacks are added (a new layer's first checkpoint, beside the older ones).

Each entry names the class (an attribute of `normlab`, or of `normlab.distributed`), its
constructor arguments and an input shape; the file holds only tensors, strings and
numbers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse

import torch

LINEAR, CONV = ((6, 5), (4, 6)), ((3, 4, 3), (2, 3, 5, 5))
CONV_INPUTS = {"1d": (2, 3, 5), "2d": CONV[1], "3d": (2, 3, 4, 4, 4)}
WEIGHT_METHODS = ("WeightNorm", "ScaledWeightNorm", "NormProp", "FastNorm", "EquiNorm")
LAYERS = [  # (class name, args, kwargs, input shape)
    *[(f"{method}Linear", LINEAR[0], {}, LINEAR[1]) for method in WEIGHT_METHODS],
    *[(f"{method}Conv{dims}", CONV[0], {"padding": 1}, shape) for method in WEIGHT_METHODS
      for dims, shape in CONV_INPUTS.items()],
    ("BatchRenorm1d", (3,), {}, (4, 3)),
    ("BatchRenorm2d", (3,), {}, (2, 3, 4, 4)),
    ("OnlineNorm1d", (3,), {}, (4, 3)),
    ("OnlineNorm2d", (3,), {}, (2, 3, 4, 4)),
    ("SyncBatchNorm", (3,), {}, (2, 3, 4, 4)),
]


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
    parser.add_argument("--append", action="store_true",
                        help="keep the file's entries, add the classes it lacks")
    args = parser.parse_args()
    entries = torch.load(args.out, weights_only=True) if args.append else []
    saved = {entry["class"] for entry in entries}
    for name, layer_args, kwargs, input_shape in LAYERS:
        if name in saved:
            continue
        torch.manual_seed(0)
        layer = randomized(layer_class(name)(*layer_args, **kwargs)).eval()
        x = torch.rand(input_shape, generator=torch.Generator().manual_seed(1))
        entries.append({"class": name, "args": list(layer_args), "kwargs": kwargs,
                        "input": x, "output": layer(x).detach(),
                        "state": layer.state_dict()})
    torch.save(entries, args.out)


if __name__ == "__main__":
    main()
