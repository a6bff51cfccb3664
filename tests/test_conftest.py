"""The test suite's own rule: under CI nothing is skipped for a missing dependency or dataset."""

import pytest

from conftest import require_module, shared_data

SKIP, FAIL = pytest.skip.Exception, pytest.fail.Exception


def outcome(function, *args):
    """The pytest outcome (skip or fail) that `function(*args)` raises, and its message."""
    with pytest.raises((SKIP, FAIL)) as raised:
        function(*args)
    return raised.type, str(raised.value)


@pytest.mark.parametrize("ci,expected", [("1", FAIL), ("true", FAIL), (None, SKIP), ("", SKIP),
                                         ("0", SKIP), ("false", SKIP)])
def test_missing_data_or_dependency_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path,
                                                                        ci, expected):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    kind, message = outcome(shared_data, tmp_path)
    assert kind is expected and f"no shared datasets at {tmp_path}" in message
    kind, message = outcome(require_module, "normlab_no_such_module")
    assert kind is expected and "normlab_no_such_module is not installed" in message
    require_module("torch")  # present: neither
