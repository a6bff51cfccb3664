import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normlab import bench, cli, training

SRC = Path(__file__).resolve().parents[2] / "src"


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
def test_train_progress_off_a_terminal_is_a_line_per_evaluation(capsys):
    assert cli.main(["train", "--task", "digits-mlp", "--norm", "none", "--epochs", "2"]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("digits-mlp none: step")]
    assert len(lines) == 2 and "(epoch 2.00)" in lines[1] and "test acc" in lines[1]


@pytest.mark.usefixtures("needs_sklearn")
def test_train_on_two_processes_matches_one_process(tmp_path):
    """--nproc-per-node 2: torchrun, DDP with synced layers, each rank its contiguous half of
    every global batch; a batch of 51 splits 26 + 25, so uneven splits are in every step."""
    norms = ["batch", "online"]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "normlab", "train", "--task", "digits-mlp", "--norm",
         ",".join(norms), "--batch-size", "51", "--nproc-per-node", "2", "--out", str(tmp_path),
         "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("2 processes") == 1  # rank 0 alone reports
    for norm in norms:
        ddp = json.loads((tmp_path / f"digits-mlp-{norm}-seed0.json").read_text())
        single = training.train(training.TrainConfig(task="digits-mlp", norm=norm,
                                                     batch_size=51)).final
        final = ddp["history"][-1]
        assert (final["step"], final["test_acc"]) == (single["step"], single["test_acc"]), norm
        for key in ("train_loss", "test_loss"):
            assert final[key] == pytest.approx(single[key], rel=1e-4), f"{norm} {key}"


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
    assert cli.main(["report", str(out), "--export", str(tmp_path / "results")]) == 2
    assert "--export needs --commit" in capsys.readouterr().err
    assert cli.main(["report", str(out), "--export", str(tmp_path / "results"), "--commit",
                     "abc", "--machine", "here", "--date", "2026-12-02"]) == 0
    assert "Ran on here, 2026-12-02, code at commit `abc`" in \
        (tmp_path / "results" / "report.md").read_text()


@pytest.mark.parametrize("options, message", [
    (["--address", "auto"], "--address and --cpus-per-job apply to --executor ray"),
    (["--executor", "ray", "--address", "auto", "--workers", "2"],
     "a Ray cluster runs as many jobs as its CPUs allow"),
    (["--executor", "ray", "--cpus-per-job", "0"], "cpus_per_job must be >= 1, got 0")])
def test_reproduce_executor_options_are_checked_before_any_run(tmp_path, capsys, options,
                                                                 message):
    assert cli.main(["reproduce", "fastnorm", "--out", str(tmp_path), *options]) == 2
    assert message in capsys.readouterr().err and not any(tmp_path.iterdir())


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
