import pytest

from normlab import bench


def test_torch_norms_case_reports_ratios_against_the_copy():
    rows = bench.run(["torch_norms"], min_run_time=0.1)
    assert [r.method for r in rows] == ["batch", "layer", "group", "instance"]
    for row in rows:
        assert row.baseline == "copy" and row.method_s > 0 and row.baseline_s > 0
        assert row.ratio == pytest.approx(row.method_s / row.baseline_s)
    table = bench.format_table(rows)
    assert "ratio" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(rows)


def test_unknown_case_lists_valid_cases():
    with pytest.raises(ValueError, match="valid cases: torch_norms"):
        bench.run(["nope"])


def test_compare_alternates_and_keeps_medians():
    calls = []
    row = bench.compare("c", "v", "m", lambda: calls.append("m"), "b",
                        lambda: calls.append("b"), min_run_time=0.01, rounds=2)
    assert {"m", "b"} <= set(calls) and row.ratio > 0
