import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab import bench, cli, training
from normlab.experiments import Store

SRC = Path(__file__).resolve().parents[2] / "src"


def _env(**extra) -> dict:
    """The environment of a `normlab` subprocess: this checkout's sources first."""
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


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
    done = subprocess.run(
        [sys.executable, "-m", "normlab", "train", "--task", "digits-mlp", "--norm",
         ",".join(norms), "--batch-size", "51", "--nproc-per-node", "2", "--out", str(tmp_path),
         "--quiet"], env=_env(), capture_output=True, text=True, timeout=300)
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
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][0]["case"] == "tiny" and out["rows"][0]["ratio"] > 0
    assert out["machine"]["threads"] == torch.get_num_threads()
    assert out["machine"]["cpu"] == bench.cpu_model()


def test_bench_table_names_the_cpu_kind(capsys, monkeypatch):
    monkeypatch.setitem(bench.CASES, "tiny", lambda t: [
        bench.compare("tiny", "n=10", "sum", lambda: sum(range(10)), "noop", lambda: None, t)])
    monkeypatch.setattr(bench, "cpu_model", lambda: "Test CPU 9000")
    assert cli.main(["bench", "--case", "tiny", "--min-run-time", "0.03"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("machine: Test CPU 9000 (torch dispatches ")


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
    assert sorted((r["config.kind"], r["config.norm"], r["status"]) for r in rows) == [
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
    (["--executor", "ray", "--cpus-per-job", "0"],
     "--cpus-per-job: expected an integer >= 1, got 0")])
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


def test_list_runs_without_posix_only_modules():
    """Windows has no fcntl: importing normlab, its results store included, and `normlab list`
    must not need it (the folder lock goes through filelock)."""
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import normlab, normlab.experiments\n"
            "from normlab import cli\n"
            "sys.exit(cli.main(['list']))")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "batch_renorm" in done.stdout


HELPER = Path(__file__).resolve().parent / "experiments" / "sweep_helper.py"


def _normlab(*args: str, code: str = "", timeout: float = 60, cwd=None,
             **env) -> subprocess.CompletedProcess:
    """`normlab ARGS` run by a fresh interpreter through the entry point, cli.main (after
    `code`, which may point the data mirrors nowhere); it must end within `timeout` s."""
    program = f"import sys\n{code}\nfrom normlab import cli\nsys.exit(cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *args], env=_env(**env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _refused(done: subprocess.CompletedProcess, command: str, *expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"normlab {command}: error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for text in expected:
        assert text in done.stderr, done.stderr


def _watch_training(marker: Path) -> str:
    """Code for `_normlab` that makes training.train leave `marker` behind when it is called
    (and then train as usual): a refusal must come before any training."""
    return ("import normlab.training as training\n"
            "_train = training.train\n"
            "def train(*args, **kwargs):\n"
            f"    open({str(marker)!r}, 'w').close()\n"
            "    return _train(*args, **kwargs)\n"
            "training.train = train\n")


@pytest.fixture
def marker(tmp_path_factory) -> Path:
    """Where `_watch_training` marks a training run: outside tmp_path, which must stay as
    the command found it."""
    return tmp_path_factory.mktemp("watch") / "trained"


@pytest.mark.parametrize("where", ["under a file", "an existing file", pytest.param(
    "in /proc", marks=pytest.mark.skipif(sys.platform != "linux", reason="Linux's /proc"))])
def test_train_refuses_an_output_it_cannot_write_before_training(tmp_path, data_root, where,
                                                                  marker):
    (tmp_path / "file").write_text("")
    out = {"under a file": tmp_path / "file" / "out", "an existing file": tmp_path / "file",
           "in /proc": Path("/proc/normlab-cli-test/out")}[where]
    done = _normlab("train", "--norm", "batch", "--data-dir", str(data_root), "--out", str(out),
                    "--quiet", code=_watch_training(marker))
    _refused(done, "train", f"--out: {'' if where == 'an existing file' else 'cannot write to '}"
                            f"{out}")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == ""


def test_train_checks_every_name_and_number_before_training_and_reports_them_all(
        tmp_path, data_root, marker):
    out = tmp_path / "new" / "out"
    done = _normlab("train", "--norm", "batch,nosuch,batch", "--lr", "0", "--epochs", "0",
                    "--rebalancer-kw", "c=1.2", "--data-dir", str(data_root), "--out", str(out),
                    code=_watch_training(marker))
    _refused(done, "train", "5 problems:", "--epochs: expected an integer >= 1, got 0",
             "--lr: expected a number > 0, got 0.0", "--norm: unknown normalization 'nosuch'",
             "--norm: 'batch' is named twice", "--rebalancer-kw: needs a rebalancer in --norm")
    assert len(done.stderr.splitlines()) == 6  # the count, then one line per problem
    assert list(tmp_path.iterdir()) == [] and not marker.exists()  # --out claimed, given back
    unknown = _normlab("train", "--norm", "batch,nosuch", "--data-dir", str(data_root),
                       code=_watch_training(marker))
    _refused(unknown, "train", "--norm: unknown normalization 'nosuch'; valid names: none, ")
    bad_keywords = _normlab("train", "--norm", "enorm", "--rebalancer-kw", "c=abc",
                            "--rebalancer-kw", "nosuch=1", "--data-dir", str(data_root),
                            code=_watch_training(marker))
    _refused(bad_keywords, "train", "--rebalancer-kw: enorm takes no keyword(s) ['nosuch']")
    only_the_value = _normlab("train", "--norm", "enorm", "--rebalancer-kw", "c=abc",
                              "--data-dir", str(data_root), code=_watch_training(marker))
    _refused(only_the_value, "train", "--rebalancer-kw: ", "(for enorm)")
    assert not marker.exists()


OFFLINE = ("import normlab.data as data\n"
           "data.MNIST_MIRRORS = ('http://127.0.0.1:9/',)\n"  # nothing listens there
           "data.CIFAR10_URL = 'http://127.0.0.1:9/cifar-10-python.tar.gz'")


@pytest.mark.parametrize("how", ["--data-dir", "NORMLAB_DATA"])
def test_train_without_data_names_where_it_looked_and_the_fallback(tmp_path, how, marker):
    nowhere = tmp_path / "nowhere"
    options, env = (["--data-dir", str(nowhere)], {}) if how == "--data-dir" else \
        ([], {"NORMLAB_DATA": str(nowhere)})
    done = _normlab("train", "--norm", "none", "--out", str(tmp_path / "out"), *options,
                    code=OFFLINE + "\n" + _watch_training(marker), **env)
    _refused(done, "train", f"--data-dir: missing {nowhere / 'mnist'}", "--data-dir or "
             "$NORMLAB_DATA", "--fallback-digits", "could not download it",
             "the root argument" if how == "--data-dir" else "from $NORMLAB_DATA")
    assert len(done.stderr.splitlines()) == 1 and not marker.exists()
    assert list(tmp_path.iterdir()) == []  # no mnist/ folder, no --out
    cifar = _normlab("train", "--task", "cifar10-fc", "--data-dir", str(nowhere), code=OFFLINE)
    _refused(cifar, "train", "--data-dir: missing", "cifar-10-python.tar.gz")
    assert "--fallback-digits" not in cifar.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("needs_sklearn")
def test_reproduce_refuses_bad_input_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    done = _normlab("reproduce", "lecture", "--quick", "--seeds", "0", "--workers", "0",
                    "--resume-from", str(tmp_path / "missing"), "--out",
                    str(tmp_path / "file" / "out"), code=OFFLINE)
    _refused(done, "reproduce", "4 problems", "--seeds: expected an integer >= 1, got 0",
             "--workers: expected an integer >= 1, got 0",
             f"--resume-from: {tmp_path / 'missing'} is not an exported results folder",
             f"--out: cannot write to {tmp_path / 'file' / 'out'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_reproduce_refuses_a_mode_the_recipe_lacks_and_a_negative_checkpoint_interval(tmp_path):
    done = _normlab("reproduce", "lecture", "--protocol", "decisive", "--quick",
                    "--checkpoint-every", "-1", "--out", str(tmp_path / "out"), code=OFFLINE)
    _refused(done, "reproduce", "2 problems", "--quick and --protocol exclude each other",
             "--checkpoint-every: expected seconds >= 0 (0: never), got -1.0")
    done = _normlab("reproduce", "lecture", "--protocol", "decisive",
                    "--out", str(tmp_path / "out"), code=OFFLINE)
    _refused(done, "reproduce", "--protocol: recipe 'lecture' has no decisive protocol; "
             "expected one of ['quick', 'full']")
    assert list(tmp_path.iterdir()) == []


def test_reproduce_refuses_a_recipe_whose_cifar_data_is_missing(tmp_path):
    done = _normlab("reproduce", "enorm", "--quick", "--out", str(tmp_path / "out"),
                    "--data-dir", str(tmp_path / "nowhere"), code=OFFLINE)
    _refused(done, "reproduce", "missing", "cifar-10-python.tar.gz",
             "point --data-dir or $NORMLAB_DATA at a folder that holds it")
    assert list(tmp_path.iterdir()) == []


def _stored_runs(out: Path) -> int:
    """The finished runs in the sweep folder `out`'s database (0 before it exists)."""
    if not (out / "results.db").exists():
        return 0
    with Store.in_folder(out) as store:
        return len(store.finished_keys())


def _reproduce_gated(out: Path, gate: Path, pid_dir: Path) -> subprocess.Popen:
    """`normlab reproduce` on two quick probes, then two that wait while `gate` exists; in a
    session of its own, so that a signal to its process group is a terminal's Ctrl-C."""
    call = (f"sweep_helper.reproduce_main({str(out)!r}, 2, 2, {str(gate)!r}, {str(pid_dir)!r}, "
            f"'--workers', '2')")  # both gated runs at once, whatever CPUs the tests may use
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(HELPER.parent), env["PYTHONPATH"]])
    return subprocess.Popen([sys.executable, "-c", f"import sweep_helper; {call}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("signum, exit_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_reproduce_says_what_it_saved_in_one_line_and_exits_at_once(
        tmp_path, monkeypatch, signum, exit_status):
    monkeypatch.syspath_prepend(HELPER.parent)
    import sweep_helper

    out, gate, pid_dir = tmp_path / "out", tmp_path / "gate", tmp_path / "pids"
    gate.touch()
    pid_dir.mkdir()
    sweep = _reproduce_gated(out, gate, pid_dir)
    try:
        deadline = time.monotonic() + 90
        # both gated runs busy in their workers, and both quick ones stored (a worker starts
        # its next run before the driver has stored the last one: on busy cores, seconds)
        while len(list(pid_dir.iterdir())) < 2 or _stored_runs(out) < 2:
            sweep_helper.assert_alive_before(sweep, deadline)
            time.sleep(0.05)
        # Ctrl-C reaches the whole process group, SIGTERM (kill) the command alone
        signalled = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(sweep.pid, signum)
        else:
            sweep.send_signal(signum)
        assert sweep.wait(timeout=30) == exit_status
        took = time.monotonic() - signalled
        err = sweep.stderr.read()
    finally:
        gate.unlink(missing_ok=True)
        sweep.kill()
        sweep.wait()
    assert err.splitlines()[-1] == (f"normlab reproduce: interrupted; 2 runs saved in {out}; "
                                    f"rerun the same command to continue"), err
    assert "leaked" not in err and "Traceback" not in err and "Warning" not in err, err
    assert took < 3, f"{took:.1f} s from the signal to the exit"
    for pid in (int(p.name) for p in pid_dir.iterdir()):  # no worker left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_list_fits_100_columns_and_bench_help_lists_the_cases():
    listing = _normlab("list")
    assert listing.returncode == 0
    assert max(map(len, listing.stdout.splitlines())) <= 100
    help_text = " ".join(_normlab("bench", "--help").stdout.split())  # argparse wraps it
    for name in bench.CASES:
        assert name in help_text.split("default: all): ", 1)[1]
    refused = _normlab("bench", "--case", "nosuch")
    assert refused.returncode == 2 and "invalid choice: 'nosuch'" in refused.stderr


def test_report_csv_goes_to_a_file_or_standard_output_and_checks_it_first(tmp_path, capsys):
    folder = Path(__file__).resolve().parents[2] / "results" / "lecture" / "quick"
    to_stdout = _normlab("report", str(folder), "--csv")
    assert to_stdout.returncode == 0, to_stdout.stderr
    header = next(csv.reader(io.StringIO(to_stdout.stdout)))
    assert len(header) == len(set(header)) and {"config.lr", "eval.lr"} <= set(header)
    to_file = _normlab("report", str(folder), "--csv", str(tmp_path / "runs.csv"))
    assert to_file.returncode == 0 and to_file.stdout == f"runs: {tmp_path / 'runs.csv'}\n"
    assert (tmp_path / "runs.csv").read_text() == to_stdout.stdout
    refused = _normlab("report", str(folder), "--csv", str(tmp_path / "no" / "runs.csv"),
                       "--commit", "abc")
    _refused(refused, "report", "2 problems", "--commit: applies to --export only",
             f"--csv: the folder {tmp_path / 'no'} does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_normlab("report", str(empty), "--csv", str(tmp_path / "out.csv")), "report",
             f"DIR: {empty} holds no results: expected results.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "runs.csv"]
    assert list(empty.iterdir()) == []
