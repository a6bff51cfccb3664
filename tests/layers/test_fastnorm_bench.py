from normlab import bench


def test_fastnorm_cases_report_every_variant_against_its_baseline():
    rows = bench.run(["fastnorm", "fastnorm_crossover"], min_run_time=0.01)
    steps = [r for r in rows if r.case == "fastnorm" and r.variant.startswith("mlp")]
    assert [(r.method, r.baseline) for r in steps] == \
        [("fastnorm", "linear"), ("weight_norm (torch)", "linear")] * 3
    updates = [r.variant for r in rows if r.case == "fastnorm" and r.method == "tracked"]
    assert updates == [f"norm update {w}x{w}, batch 1" for w in (256, 1024, 4096)]
    crossover = [r for r in rows if r.case == "fastnorm_crossover"]
    assert [r.variant.split()[-1] for r in crossover] == ["1", "8", "16", "32", "64", "128", "256"]
    assert all(r.method_s > 0 and r.baseline_s > 0 for r in rows)
