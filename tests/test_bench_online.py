from normlab import bench
from normlab.bench_online import ONLINE_SHAPES


def test_online_case_times_the_three_shapes_against_batch_norm():
    rows = bench.run(["online"], min_run_time=0.05)
    assert [r.variant for r in rows] == ["x".join(map(str, s)) for s in ONLINE_SHAPES]
    for row in rows:
        assert (row.method, row.baseline) == ("online", "batch")
        assert row.method_s > 0 and row.baseline_s > 0


def test_batch_renorm_case_is_registered():
    assert "batch_renorm" in bench.CASES
