"""The scripts in tools/, run on small configurations."""

import importlib.util
import sys
from pathlib import Path

from normlab.lab import training

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_cost_estimate_times_a_run_with_a_rebalancer():
    # ENorm's runs build their rebalancer from the registry, as training does
    cost_tool = load_tool("full_protocol_cost")
    config = training.TrainConfig(task="digits-mlp", norm="batch+enorm", batch_size=8)
    step_seconds, sample_seconds = cost_tool.measure(config, None, steps=2)
    assert step_seconds > 0 and sample_seconds > 0
