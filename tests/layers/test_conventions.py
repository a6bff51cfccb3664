"""What every normlab layer owes the PyTorch ecosystem (DESIGN.md, conventions):
device=/dtype= factory arguments, float64 and bfloat16, construction on the
meta device, torch.compile, torch.export and ONNX."""

import copy

import pytest
import torch

import normlab
from normlab import registry

# Options that steer a class off its default path, so that path is covered too; a class
# without an entry is built with its defaults.
NON_DEFAULT_KW = {
    "OnlineNorm2d": {"ecm": "ls"},
    "ScaledWeightNormConv2d": {"padding": 1},
    "NormPropConv2d": {"padding_mode": "reflect", "padding": 1},
    "EquiNormConv2d": {"stride": 2},
    "FastNormConv2d": {"padding": 1},
}
# the input shape of an activation normalizer's `dim` (a 1d one takes (N, C) and (N, C, L))
ACTIVATION_SHAPES = {1: (6, 4, 5), 2: (6, 4, 3, 3), 3: (2, 4, 3, 3, 3)}


def _example(cls, dim):
    """(constructor taking device=/dtype=, input shape) of a registered layer class; `dim`:
    an activation normalizer's, None for a weight normalizer."""
    options = NON_DEFAULT_KW.get(cls.__name__, {})
    if dim is not None:
        return (lambda **kw: cls(4, **options, **kw)), ACTIVATION_SHAPES[dim]
    if cls.plain_type is torch.nn.Linear:
        return (lambda **kw: cls(4, 3, **options, **kw)), (6, 4)
    spatial = int(cls.plain_type.__name__[-2])  # Conv1d/2d/3d
    return (lambda **kw: cls(4, 3, 3, **options, **kw)), (2, 4) + (5,) * spatial


def _registered_layer_classes() -> dict[type, int | None]:
    """Each normlab layer class of the registry -> its activation dim (None: weight family)."""
    classes = {}
    for name in normlab.available():
        method = registry.get(name)
        classes.update(method.dims)
        classes.update(dict.fromkeys(method.replaces.values()))
    return classes


# every layer class of the registry: name -> (constructor taking device=/dtype=, input shape)
LAYERS = {cls.__name__: _example(cls, dim) for cls, dim in _registered_layer_classes().items()}
# FastNorm's fused mode records each training forward with a tensor hook that
# FastNormSGD reads: Python state, so training breaks the graph there (tested below).
ONE_GRAPH = [(name, training) for name in LAYERS for training in (True, False)
             if not (name == "FastNormLinear" and training)]


def build(name, **factory):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make(**factory)
    with torch.no_grad():  # gains, biases and affines away from 1 and 0, so all of them matter
        for parameter in layer.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.rand_like(parameter) * 0.2)
    return layer, shape


def inputs(shape, dtype=torch.float32, seed=1):
    # non-negative, as EquiNorm assumes (ReLU outputs)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", LAYERS)
def test_dtype_factory_argument_computes_the_float64_function(name, training, dtype):
    layer, shape = build(name, dtype=dtype)
    assert {p.dtype for p in layer.parameters()} == {dtype}
    reference = copy.deepcopy(layer).double().train(training)
    layer.train(training)
    x = inputs(shape, dtype)
    out = layer(x)
    assert out.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 4e-2
    torch.testing.assert_close(out.double(), reference(x.double()), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("name", LAYERS)
def test_built_on_meta_then_materialized_equals_a_layer_built_in_place(name):
    layer, shape = build(name)
    meta, _ = build(name, device="meta")
    assert {t.device.type for t in (*meta.parameters(), *meta.buffers())} == {"meta"}
    assert meta(torch.empty(shape, device="meta")).shape == layer(inputs(shape)).shape
    torch.manual_seed(0)
    meta.to_empty(device="cpu").reset_parameters()
    torch.manual_seed(0)
    fresh = LAYERS[name][0]()
    torch.testing.assert_close(meta.state_dict(), fresh.state_dict(), rtol=0, atol=0)


def run_steps(layer, shape, steps=2):
    """Outputs, input gradients, parameter gradients and buffers over `steps` steps."""
    record = []
    for step in range(steps):
        x = inputs(shape, seed=step).requires_grad_(True)
        out = layer(x)
        out.backward(inputs(out.shape, seed=100 + step) - 0.5)
        record += [out.detach(), x.grad]
    record += [p.grad for p in layer.parameters()] + [b.clone() for b in layer.buffers()]
    return record


def assert_compiled_matches_eager(name, training, backend):
    torch._dynamo.reset()
    layer, shape = build(name)
    layer.train(training)
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, backend=backend, fullgraph=True)
    torch.testing.assert_close(run_steps(compiled, shape), run_steps(layer, shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, training", ONE_GRAPH)
def test_compiles_in_one_graph_and_matches_eager(name, training):
    assert_compiled_matches_eager(name, training, "aot_eager")


def test_fastnorm_fused_training_compiles_and_trains_like_eager():
    torch.manual_seed(0)
    model = normlab.convert(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(),
                                                torch.nn.Linear(6, 3)), "fastnorm").double()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    optimizers = [normlab.FastNormSGD(m.parameters(), lr=0.1) for m in (model, twin)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 8, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (4,), generator=generator)
        for net, optimizer in zip((compiled, twin), optimizers):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for index in (0, 2):
        torch.testing.assert_close(model[index].logical_weight(), twin[index].logical_weight(),
                                   rtol=1e-12, atol=0)
        assert not torch.equal(model[index].row_scale, torch.ones_like(model[index].row_scale))


# Inductor generates and builds C++: tens of seconds a layer on two cores.
# One small case per family runs by default.
@pytest.mark.parametrize("name", [
    "BatchRenorm2d", "WeightNormConv2d",
    pytest.param("OnlineNorm2d", marks=pytest.mark.slow),
    pytest.param("EquiNormConv2d", marks=pytest.mark.slow)])
def test_inductor_matches_eager_in_training(name):
    assert_compiled_matches_eager(name, True, "inductor")


@pytest.mark.parametrize("name", LAYERS)
def test_eval_mode_exports_with_torch_export(name):
    layer, shape = build(name)
    layer.eval()
    program = torch.export.export(layer, (inputs(shape),))
    for seed in (2, 3):  # not specialized to the example input
        x = inputs(shape, seed=seed)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-6, atol=1e-6)


class _Side(torch.nn.Module):
    """The layers side by side, each on its own input: one ONNX export for all of them."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, *xs):
        return tuple(layer(x) for layer, x in zip(self.layers, xs))


def test_eval_mode_exports_to_onnx_and_onnxruntime_agrees():
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    layers, shapes = zip(*(build(name) for name in LAYERS))
    model = _Side(layers).eval()
    program = torch.onnx.export(model, tuple(inputs(s) for s in shapes), dynamo=True,
                                verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for seed in (2, 3):  # not specialized to the example inputs
        xs = [inputs(s, seed=seed) for s in shapes]
        outs = session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
        with torch.no_grad():
            expected = model(*xs)
        for name, out, reference in zip(LAYERS, outs, expected):
            torch.testing.assert_close(torch.from_numpy(out), reference, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_equinorm_degenerate_check_stays_out_of_the_compiled_graph():
    torch._dynamo.reset()
    layer = normlab.EquiNormConv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        layer.weight[1] = 0.3  # constant kernel: no positive weight after the shift
    x = inputs((4, 2, 5, 5))
    with pytest.warns(RuntimeWarning, match=r"output channel\(s\) \[1\]"):
        expected = layer(x)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["OnlineNorm2d", "BatchRenorm2d"])
def test_running_statistics_stay_float32_in_a_bfloat16_module(name):
    # in bfloat16 a momentum of 0.01 moves them by less than their resolution
    layer, shape = build(name)
    layer.to(torch.bfloat16)
    # (BatchRenorm2d's num_batches_tracked is int64, as in torch's BatchNorm)
    assert {b.dtype for b in layer.buffers() if b.is_floating_point()} == {torch.float32}
    assert layer.weight.dtype == torch.bfloat16
    before = layer.running_mean.clone()
    out = layer(inputs(shape, torch.bfloat16) * 0.01)
    assert out.dtype == torch.bfloat16 and not torch.equal(layer.running_mean, before)
