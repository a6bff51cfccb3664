import pytest
import torch

from normlab import bench, registry


def test_torch_norms_case_reports_ratios_against_the_copy():
    rows = bench.run(["torch_norms"], min_run_time=0.1)
    assert [r.method for r in rows] == ["batch", "layer", "group", "instance"]
    for row in rows:
        assert row.baseline == "copy" and row.method_s > 0 and row.baseline_s > 0
        assert row.ratio > 0
    table = bench.format_table(rows)
    assert "ratio" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(rows)


def test_the_table_gives_three_significant_digits_of_small_ratios():
    # ENorm's target is 0.03x: two decimals would print 0.0295x as 0.03x
    row = bench.Row("c", "v", "m", "b", 0.0295e-3, 1e-3, 0.0295)
    assert bench.format_table([row]).splitlines()[-1].endswith(" 0.0295x")


def test_unknown_case_lists_valid_cases():
    with pytest.raises(ValueError, match="valid cases: torch_norms"):
        bench.run(["nope"])


def test_compare_alternates_and_keeps_medians():
    calls = []
    row = bench.compare("c", "v", "m", lambda: calls.append("m"), "b",
                        lambda: calls.append("b"), min_run_time=0.01, rounds=2)
    assert {"m", "b"} <= set(calls) and row.ratio > 0


def test_timings_run_on_torchs_threads_as_set():
    threads, seen = torch.get_num_threads(), set()
    torch.set_num_threads(2)
    try:
        bench.median_seconds(lambda: seen.add(torch.get_num_threads()), min_run_time=0.01)
    finally:
        torch.set_num_threads(threads)
    assert seen == {2}


def test_the_ratio_pairs_the_times_by_round(monkeypatch):
    # A burst of load in round 2 slows both sides; its pair of times keeps its ratio.
    times = iter([1.0, 2.0, 3.0, 3.3, 2.0, 4.4])  # baseline, method; per round
    monkeypatch.setattr(bench, "median_seconds", lambda fn, min_run_time: next(times))
    row = bench.compare("c", "v", "m", lambda: None, "b", lambda: None, min_run_time=0.01,
                        rounds=3)
    assert (row.method_s, row.baseline_s) == (3.3, 2.0)
    assert row.ratio == pytest.approx(2.0)  # rounds' ratios 2, 1.1, 2.2 (medians' ratio: 1.65)


def test_online_case_times_the_three_shapes_against_batch_norm():
    rows = bench.run(["online"], min_run_time=0.05)
    shapes = ["x".join(map(str, s)) for s in bench.ONLINE_SHAPES]
    assert [(r.method, r.variant, r.baseline) for r in rows] == [
        *(("online", shape, "batch") for shape in shapes), ("online(ecm=ls)", shapes[0], "batch")]


def test_online_small_batch_and_1d_cases_time_their_shapes_against_their_baselines():
    rows = bench.run(["online_small_batch", "online_1d"], min_run_time=0.01)
    small = [r for r in rows if r.case == "online_small_batch"]
    assert [(r.variant, r.baseline) for r in small] == [
        ("x".join(map(str, s)), baseline) for s in bench.ONLINE_SMALL_BATCH_SHAPES
        for baseline in ("group(32)", "batch")]
    one_d = [(r.method, r.variant, r.baseline) for r in rows if r.case == "online_1d"]
    assert one_d == [(f"online(ecm={ecm})", "x".join(map(str, s)), "batch")
                     for ecm in ("ac", "ls") for s in bench.ONLINE_1D_SHAPES]
    assert all(r.method_s > 0 and r.baseline_s > 0 for r in rows)


def test_channels_last_case_times_each_layer_on_both_layouts():
    rows = bench.run(["channels_last"], min_run_time=0.01)
    assert [(r.variant, r.method, r.baseline) for r in rows] == [
        ("32x64x32x32", f"{name}(channels_last)", f"{name}(contiguous)")
        for name in ("online", "batch_renorm", "batch")]
    assert all(r.method_s > 0 and r.baseline_s > 0 for r in rows)


def test_equinorm_layers_case_times_the_conv_batches_and_the_linear_layer():
    rows = bench.run(["equinorm_layers"], min_run_time=0.01)
    assert [(r.method, r.variant, r.baseline) for r in rows] == [
        *(("EquiNormConv2d", f"{batch}x64x32x32", "conv2d+batch")
          for batch in bench.EQUINORM_CONV_BATCHES),
        ("EquiNormLinear", "128x784", "linear+batch")]
    assert all(r.method_s > 0 and r.baseline_s > 0 for r in rows)


def test_every_case_is_registered():
    assert list(bench.CASES) == ["torch_norms", "online", "online_small_batch", "online_1d",
                                 "batch_renorm", "channels_last", "weight_norm",
                                 "equinorm", "equinorm_layers", "enorm", "fastnorm",
                                 "fastnorm_crossover", "sync", "fold", "methods"]


def test_fastnorm_cases_report_every_variant_against_its_baseline():
    rows = bench.run(["fastnorm", "fastnorm_crossover"], min_run_time=0.01)
    steps = [r for r in rows if r.case == "fastnorm" and r.variant.startswith("mlp")]
    pair = [("fastnorm", "linear"), ("weight_norm (torch)", "linear")]
    assert [(r.method, r.baseline) for r in steps] == \
        pair + [("fastnorm, one repeated sample", "fastnorm, fresh samples")] + pair * 2
    assert [r.variant.split()[-1] for r in steps] == ["1"] * 3 + ["16"] * 2 + ["128"] * 2
    updates = [r.variant for r in rows if r.case == "fastnorm" and r.method == "tracked"]
    assert updates == [f"norm update {w}x{w}, batch 1" for w in (256, 1024, 4096)]
    crossover = [r for r in rows if r.case == "fastnorm_crossover"]
    assert [r.variant.split()[-1] for r in crossover] == ["2", "8", "16", "32", "64", "128", "256"]
    assert all((r.method, r.baseline) == ("tracked", "explicit norms") for r in crossover)


def test_batch_renorm_rows_cover_batch_2_and_the_one_dimensional_inputs():
    rows = bench.run(["batch_renorm"], min_run_time=0.01)
    assert [r.variant for r in rows] == ["32x64x32x32", "2x64x32x32", "256x1024", "32x512"]


@pytest.mark.parametrize("name,method,baseline", [
    ("enorm", "enorm cycle", "sgd step"), ("equinorm", "equinorm", "batch"),
    ("weight_norm", "WeightNormLinear", "torch weight_norm"),
    ("batch_renorm", "batch_renorm", "batch")])
def test_model_cases_compare_against_their_baseline(name, method, baseline):
    rows = bench.run([name], min_run_time=0.01)
    assert all((r.case, r.method, r.baseline) == (name, method, baseline) for r in rows)
    assert all(r.method_s > 0 and r.baseline_s > 0 for r in rows)


def test_sync_case_times_each_synced_norm_against_itself_unsynced_on_two_processes():
    rows = bench.run(["sync"], min_run_time=0.01)
    assert [(r.method, r.baseline) for r in rows] == \
        [(f"{norm} synced", f"{norm} unsynced") for norm in bench.SYNC_NORMS]
    assert all(r.method_s > 0 and r.baseline_s > 0 for r in rows)


def test_fold_case_times_folded_models_against_plain_ones():
    rows = bench.run(["fold"], min_run_time=0.01)
    assert [r.method for r in rows] == ["fold(batch)", "fold(online)", "fold(normprop)",
                                        "fold(equinorm)", "fold(batch)", "fold(batch_renorm)"]
    assert all(r.baseline == "plain" and r.ratio > 0 for r in rows)


@pytest.mark.slow
def test_methods_case_times_every_registered_layer_normalizer_against_its_baseline():
    rows = bench.run(["methods"], min_run_time=0.01)
    layer_methods = [name for name in registry.available() if name != "none"
                     and registry.get(name).family in ("activation", "weight")]
    assert [r.method for r in rows] == layer_methods
    for row in rows:
        family = registry.get(row.method).family
        assert row.baseline == ("batch" if family == "activation" else "plain")
        assert row.method_s > 0 and row.baseline_s > 0 and row.ratio > 0
