import csv
import io
import json
from pathlib import Path

import pytest

from normlab import bench, cli


def test_list_prints_the_registry(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "family" in out and "Ioffe and Szegedy" in out
    assert all(name in out for name in ["none", "batch", "layer", "group", "instance"])


@pytest.mark.usefixtures("needs_sklearn")
def test_train_compares_norms_and_writes_json(tmp_path, capsys):
    code = cli.main(["train", "--task", "digits-mlp", "--norm", "none,batch", "--epochs", "1",
                     "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "none" in out and "batch" in out and "test acc" in out
    metrics = json.loads((tmp_path / "digits-mlp-batch-seed0.json").read_text())
    assert metrics["status"] == "done" and metrics["history"][-1]["test_acc"] > 0.5


@pytest.mark.usefixtures("needs_sklearn")
def test_train_falls_back_to_digits_without_mnist(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("normlab.data.MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    code = cli.main(["train", "--norm", "batch", "--data-dir", str(tmp_path),
                     "--fallback-digits", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "falling back to the digits dataset" in out and "digits-mlp" in out


def test_bad_input_is_one_clear_line(capsys):
    assert cli.main(["train", "--norm", "bn", "--task", "digits-mlp"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_bench_json(capsys, monkeypatch):
    monkeypatch.setitem(bench.CASES, "tiny", lambda t: [
        bench.compare("tiny", "n=10", "sum", lambda: sum(range(10)), "noop", lambda: None, t)])
    assert cli.main(["bench", "--case", "tiny", "--json", "--min-run-time", "0.03"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["case"] == "tiny" and rows[0]["ratio"] > 0


@pytest.mark.usefixtures("needs_sklearn")
def test_reproduce_writes_a_report_and_report_rerenders_it(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(Path(__file__).parent / "experiments")
    import sweep_helper

    from normlab import experiments

    monkeypatch.setitem(experiments.RECIPES, "tiny", sweep_helper.tiny_recipe())
    out = tmp_path / "tiny"
    assert cli.main(["reproduce", "tiny", "--quick", "--seeds", "1", "--workers", "1",
                     "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {out / 'report.md'}")
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.md").exists() and "report:" in capsys.readouterr().out
    assert cli.main(["report", str(out), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted((r["kind"], r["norm"], r["status"]) for r in rows) == [
        ("probe", "", "done")] * sweep_helper.POINTS + [("train", "batch", "done"),
                                                        ("train", "none", "done")]


def test_reproduce_unknown_recipe_is_one_clear_line(capsys):
    assert cli.main(["reproduce", "nope", "--quick"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_rebalancer_keywords_reach_the_rebalancer_only(monkeypatch, capsys):
    from normlab import training

    configs = []

    def fake_train(config, **kw):
        configs.append(config)
        return training.TrainResult(config, "done", [], 0.0)

    monkeypatch.setattr(training, "train", fake_train)
    assert cli.main(["train", "--task", "digits-mlp", "--norm", "none,batch+enorm",
                     "--rebalancer-kw", "c=1.2", "--rebalancer-kw", "batchnorm=affine"]) == 0
    assert [c.rebalancer_kw for c in configs] == [{}, {"c": 1.2, "batchnorm": "affine"}]
    assert cli.main(["train", "--norm", "batch", "--rebalancer-kw", "c=1.2"]) == 2
    assert "needs a rebalancer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--norm", "enorm", "--rebalancer-kw", "c"])
