"""Checkpoints saved by earlier versions of normlab's layers still load, and compute what
they computed: tests/fixtures/layer_states.pt holds state dicts and evaluation-mode outputs
saved by the layers of the commit before the redesign (tools/save_layer_states.py)."""

from pathlib import Path

import pytest
import torch

import normlab
import normlab.distributed

FIXTURE = Path(__file__).parent / "fixtures" / "layer_states.pt"
ENTRIES = torch.load(FIXTURE, weights_only=True)


def test_the_fixture_covers_every_public_layer():
    saved = {entry["class"] for entry in ENTRIES}
    layers = {name for name in normlab.__all__ if isinstance(getattr(normlab, name), type)
              and issubclass(getattr(normlab, name), torch.nn.Module)}
    assert layers <= saved, f"no saved state for {sorted(layers - saved)}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[entry["class"] for entry in ENTRIES])
def test_a_saved_state_dict_loads_and_computes_the_same(entry):
    cls = getattr(normlab, entry["class"], None) or getattr(normlab.distributed, entry["class"])
    layer = cls(*entry["args"], **entry["kwargs"])
    layer.load_state_dict(entry["state"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(entry["input"]), entry["output"],
                                   rtol=1e-6, atol=1e-7)
