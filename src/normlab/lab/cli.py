"""The `normlab` command: list | train | reproduce | report | bench.

Every command checks all of its inputs before it does any work and reports
every problem found in one message, each naming its flag (exit status 2);
nothing is created for a command it refuses.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

from .. import registry
from .text import text_table

WIDTH = 100  # the columns `normlab list` fits in


class InputError(ValueError):
    """Bad command-line input: every problem found, each naming its flag."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def cmd_list(args) -> int:
    rows = [(m.name, m.family, f"{m.paper}\n{m.summary}")
            for m in map(registry.get, registry.available())]
    print(text_table(("name", "family", "paper; what it does"), rows, width=WIDTH))
    return 0


def _number_problems(*checks: tuple[str, float, bool, str]) -> list[str]:
    """``(flag, value, acceptable, expected)`` -> a line for each unacceptable value."""
    return [f"{flag}: expected {expected}, got {value}"
            for flag, value, acceptable, expected in checks if not acceptable]


def _claim_output(folder: str | os.PathLike, flag: str) -> tuple[list[Path], list[str]]:
    """Create `folder` (with its missing parents) and check that a file can be written in it.

    Returns the folders it created, deepest first (`_release_output` removes them when the
    command is refused after all), and the problems found: none, or one naming `flag`.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return [], [f"{flag}: {path} exists and is not a folder; name a folder"]
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        _release_output(created)
        return [], [f"{flag}: cannot write to {path} ({err.strerror or err}); "
                    f"name a folder that can be created and written"]
    return created, []


def _release_output(created: list[Path]) -> None:
    for folder in created:  # deepest first; one that holds files stays
        try:
            folder.rmdir()
        except OSError:
            break


def cmd_train(args) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker that torchrun started: the launcher
        return _train_in_process_group(args)  # checked the input and prepared --out
    plan = _train_plan(args, say=print)
    if args.nproc_per_node > 1:
        return _launch(args.nproc_per_node, args.argv)
    return _train(args, plan, report=True)


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this same command in `nproc` processes through torch.distributed.run (torchrun)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(["--standalone", f"--nproc-per-node={nproc}", "--module", "normlab",
                       *argv])
    except ChildFailedError as err:
        print(f"normlab train: a process failed:\n{err}", file=sys.stderr)
        return 1
    return 0


def _train_in_process_group(args) -> int:
    """Data-parallel training in torchrun's process group (see `training.train`); the CPU
    tensors of the training loop take the gloo backend. Rank 0 alone reports."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        args.nproc_per_node = dist.get_world_size()
        return _train(args, _train_plan(args, say=None), report=dist.get_rank() == 0)
    finally:
        dist.destroy_process_group()


def _train_plan(args, say) -> list:
    """The runs `normlab train` will do (`TrainConfig`s), once every input is checked: numbers,
    names, --out (created), the data (read or downloaded; MNIST falls back to digits with
    --fallback-digits, which `say` announces). Raises `InputError` listing every problem."""
    from . import data, training

    problems = _number_problems(
        ("--epochs", args.epochs, args.epochs >= 1, "an integer >= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "a number > 0"),
        ("--momentum", args.momentum, 0 <= args.momentum < 1, "a number in [0, 1)"),
        ("--weight-decay", args.weight_decay,
         math.isfinite(args.weight_decay) and args.weight_decay >= 0, "a number >= 0"),
        ("--nproc-per-node", args.nproc_per_node, args.nproc_per_node >= 1, "an integer >= 1"))
    if args.nproc_per_node > args.batch_size >= 1:
        problems.append(f"--batch-size: the global batch must be at least --nproc-per-node "
                        f"({args.nproc_per_node}), got {args.batch_size}")
    if args.fallback_digits and args.task != "mnist-mlp":
        problems.append(f"--fallback-digits: replaces MNIST for --task mnist-mlp; "
                        f"--task {args.task} has no fallback")
    norms = args.norm.split(",")
    rebalancer_kw = dict(args.rebalancer_kw)
    rebalanced = set()
    for norm in norms:
        try:
            if training.split_norm(norm)[1]:
                rebalanced.add(norm)
        except ValueError as err:
            problems.append(f"--norm: {err}")
    for norm in sorted({n for n in norms if norms.count(n) > 1}):
        problems.append(f"--norm: {norm!r} is named twice")
    if rebalancer_kw and not rebalanced:
        problems.append("--rebalancer-kw: needs a rebalancer in --norm, e.g. enorm or "
                        "batch+enorm")
    for norm in sorted(rebalanced) if rebalancer_kw else []:
        try:  # the rebalancer built with these keywords, on the task's (untrained) model
            config = training.TrainConfig(task=args.task, norm=norm, rebalancer_kw=rebalancer_kw)
            model = training.build_model(config)
            registry.get(training.split_norm(norm)[1]).rebalancer(
                model, training.build_optimizer(model, config), **rebalancer_kw)
        except (TypeError, ValueError) as err:  # a name it does not take, a value it refuses
            problems.append(f"--rebalancer-kw: {err} (for {norm})")
    created, out_problems = _claim_output(args.out, "--out") if args.out else ([], [])
    if problems or out_problems:
        _release_output(created)
        raise InputError(problems + out_problems)

    task = args.task
    dataset = training.TASKS[task].dataset
    try:  # last, as it may download; both splits, which training then reads from memory
        for split in ("test", "train"):
            data.load(dataset, split, root=args.data_dir)
    except data.DataError as err:
        if args.fallback_digits:
            if say:
                say(f"MNIST unavailable ({err}); falling back to the digits dataset "
                    f"that ships with scikit-learn.")
            task = "digits-mlp"
        else:
            _release_output(created)
            fallback = (", or add --fallback-digits to train on scikit-learn's digits"
                        if task == "mnist-mlp" else "")
            raise InputError([f"--data-dir: {err}. Point --data-dir or $NORMLAB_DATA at a "
                              f"folder that holds the files, or let normlab download them "
                              f"(needs the network){fallback}"]) from None
    return [training.TrainConfig(
        task=task, norm=norm, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
        seed=args.seed, momentum=args.momentum, weight_decay=args.weight_decay,
        rebalancer_kw=rebalancer_kw if norm in rebalanced else {}) for norm in norms]


def _train(args, configs: list, report: bool) -> int:
    from . import training

    task = configs[0].task
    results = []
    for config in configs:
        # a bar on a terminal; elsewhere (a cluster job's log, | tee) a line per evaluation
        on_terminal = sys.stderr.isatty()
        show = report and not args.quiet
        result = training.train(config, data_dir=args.data_dir,
                                progress=show and on_terminal,
                                on_eval=_print_eval(f"{task} {config.norm}")
                                if show and not on_terminal else None)
        results.append(result)
        if args.out and report:
            path = Path(args.out) / f"{task}-{config.norm}-seed{args.seed}.json"
            path.write_text(json.dumps(result.to_dict(), indent=2))
    if not report:
        return 0
    processes = f" (global), {args.nproc_per_node} processes" if args.nproc_per_node > 1 else ""
    print(f"{task}: {args.epochs} epoch(s), batch {args.batch_size}{processes}, lr {args.lr}, "
          f"seed {args.seed}")
    rows = [(r.config.norm, r.status, _fmt(r.final.get("train_loss")),
             _fmt(r.final.get("test_loss")), _fmt(r.final.get("test_acc"), percent=True),
             f"{r.wall_time:.1f}") for r in results]
    print(text_table(("norm", "status", "train loss", "test loss", "test acc", "seconds"), rows))
    if args.out:
        print(f"metrics written to {args.out}")
    return 0


def _print_eval(label: str):
    def print_point(point: dict) -> None:
        print(f"{label}: step {point['step']} (epoch {point['epoch']:.2f}), train loss "
              f"{point['train_loss']:.4f}, test loss {point['test_loss']:.4f}, test acc "
              f"{100 * point['test_acc']:.2f}%", file=sys.stderr, flush=True)
    return print_point


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def cmd_reproduce(args) -> int:
    from . import experiments

    mode = "quick" if args.quick else args.protocol
    out = Path(args.out or f"runs/{args.recipe}{'' if mode == 'full' else '-' + mode}")
    problems = []
    if args.quick and args.protocol != "full":
        problems.append("--quick and --protocol exclude each other")
    try:
        recipe = experiments.get_recipe(args.recipe)
    except ValueError as err:
        problems.append(f"recipe: {err}")
    else:
        if mode not in recipe.seeds:
            problems.append(f"--protocol: recipe {args.recipe!r} has no {mode} protocol; "
                            f"expected one of {recipe.modes()}")
    problems += _number_problems(
        ("--seeds", args.seeds, args.seeds is None or args.seeds >= 1, "an integer >= 1"),
        ("--workers", args.workers, args.workers is None or args.workers >= 1,
         "an integer >= 1"),
        ("--cpus-per-job", args.cpus_per_job, args.cpus_per_job >= 1, "an integer >= 1"),
        ("--checkpoint-every", args.checkpoint_every, args.checkpoint_every >= 0,
         "seconds >= 0 (0: never)"))
    local = args.address is None
    if args.executor == "ray" and args.workers is not None and not local:
        problems.append("--workers: sizes the local pool or a local Ray instance; a Ray "
                        "cluster runs as many jobs as its CPUs allow")
    if args.executor != "ray" and (args.address is not None or args.cpus_per_job != 1):
        problems.append("--address and --cpus-per-job apply to --executor ray")
    if args.resume_from is not None:
        try:
            experiments.exported_runs(args.resume_from)
        except ValueError as err:
            problems.append(f"--resume-from: {err}")
    # the sweep creates --out itself (its lock is its first write): claimed here only to
    # check it, and released
    created, out_problems = _claim_output(out, "--out")
    _release_output(created)
    if problems or out_problems:
        raise InputError(problems + out_problems)
    if args.executor == "ray":
        executor = experiments.RayCluster(
            args.address, cpus_per_job=args.cpus_per_job,
            num_cpus=args.workers * args.cpus_per_job if args.workers and local else None)
    else:
        executor = experiments.LocalPool(args.workers)
    try:
        path = experiments.reproduce(args.recipe, out, quick=args.quick, seeds=args.seeds,
                                     data_dir=args.data_dir, executor=executor,
                                     resume_from=args.resume_from, protocol=args.protocol,
                                     checkpoint_every=args.checkpoint_every)
    except experiments.Interrupted as err:
        why = "interrupted" if err.signum else f"stopped: {err}"
        print(f"normlab reproduce: {why}; {_saved_runs(out)} runs saved in {out}; rerun the "
              f"same command to continue", file=sys.stderr)
        return err.exit_status
    print(f"report: {path}")
    return 0


def _saved_runs(folder: Path) -> int:
    """The finished runs stored in results folder `folder` (which an interrupted sweep holds)."""
    from .experiments.store import DB_NAME, Store

    if not (folder / DB_NAME).exists():
        return 0
    with Store.in_folder(folder) as store:
        return len(store.finished_keys())


def cmd_report(args) -> int:
    from . import experiments

    problems = []
    if not args.export:
        problems += [f"{flag}: applies to --export only" for flag, value in (
            ("--commit", args.commit), ("--machine", args.machine), ("--date", args.date))
            if value is not None]
    elif not args.commit or not args.machine:
        problems.append("--export needs --commit (the code the runs ran on) and --machine "
                        "(where they ran)")
    csv_file = None if args.csv in (None, "-") else Path(args.csv)
    if csv_file is not None and csv_file.is_dir():
        problems.append(f"--csv: {csv_file} is a folder; name a file (or none: standard "
                        f"output)")
    elif csv_file is not None and not csv_file.parent.is_dir():
        problems.append(f"--csv: the folder {csv_file.parent} does not exist")
    if not _holds_results(Path(args.dir)):
        problems.append(f"DIR: {args.dir} holds no results: expected results.db (the --out "
                        f"folder of `normlab reproduce`) or runs.csv and meta.json (an "
                        f"exported folder)")
    if problems:
        raise InputError(problems)
    if args.csv is not None:
        text = experiments.runs_csv(args.dir)
        if csv_file is None:
            sys.stdout.write(text)
        else:
            csv_file.write_text(text)
            print(f"runs: {csv_file}")
        return 0
    if args.export:
        path = experiments.export(args.dir, args.export, args.commit, args.machine, args.date)
        print(f"report: {path}")
        return 0
    print(f"report: {experiments.render(args.dir)}")
    return 0


def _holds_results(folder: Path) -> bool:
    from .experiments.report import CSV_NAME, META_NAME
    from .experiments.store import DB_NAME

    return (folder / DB_NAME).exists() or all((folder / name).exists()
                                              for name in (CSV_NAME, META_NAME))


def keyword(text: str) -> tuple[str, object]:
    """``"c=1.2"`` -> ``("c", 1.2)``: the value as a Python literal, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def cmd_bench(args) -> int:
    from . import bench

    problems = _number_problems(("--min-run-time", args.min_run_time,
                                 math.isfinite(args.min_run_time) and args.min_run_time > 0,
                                 "a number of seconds > 0"))
    if problems:
        raise InputError(problems)
    rows = bench.run(args.case, min_run_time=args.min_run_time)
    if args.json:
        print(json.dumps({"machine": bench.machine(), "rows": [r.to_dict() for r in rows]},
                         indent=2))
    else:
        print(f"machine: {bench.format_machine(bench.machine())}")
        print(bench.format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import CASES
    from .experiments import RECIPES
    from .training import TASKS

    parser = argparse.ArgumentParser(prog="normlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="print the registered normalization methods").set_defaults(
        run=cmd_list)

    train = sub.add_parser("train", help="train one task with one or more normalizers")
    train.add_argument("--task", choices=sorted(TASKS), default="mnist-mlp")
    train.add_argument("--norm", default="batch",
                       help="a registered name, or several separated by commas to compare them "
                            "(a rebalancer joins a layer norm with '+', as in batch+enorm)")
    train.add_argument("--lr", type=float, default=0.1)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--momentum", type=float, default=0.0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--rebalancer-kw", type=keyword, action="append", default=[],
                       metavar="KEY=VALUE",
                       help="a keyword for the rebalancer (repeatable), e.g. c=1.2 for enorm")
    train.add_argument("--data-dir", default=None,
                       help="dataset root (default: $NORMLAB_DATA, else ~/.cache/normlab)")
    train.add_argument("--out", default=None, help="folder for the JSON metrics")
    train.add_argument("--fallback-digits", action="store_true",
                       help="train digits-mlp when MNIST is absent and cannot be downloaded")
    train.add_argument("--quiet", action="store_true",
                       help="no progress (a bar on a terminal, else a line per evaluation)")
    train.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                       help="train data-parallel (DDP) on N processes of this machine, through "
                            "torch.distributed.run; --batch-size is then the global batch, "
                            "batch-dependent layers are synced, rank 0 writes the metrics")
    train.set_defaults(run=cmd_train)

    decisive = [name for name, recipe in RECIPES.items() if "decisive" in recipe.seeds]
    reproduce = sub.add_parser("reproduce", help="rerun a paper's experiment and report it, "
                                                 "claim by claim")
    reproduce.add_argument("recipe",
                           help=", ".join(RECIPES))
    reproduce.add_argument("--quick", action="store_true",
                           help="a cut-down protocol that finishes in minutes")
    reproduce.add_argument("--protocol", choices=("full", "decisive"), default="full",
                           help="full: the paper's protocol as far as a CPU allows (default); "
                                "decisive: the fewest runs that decide every claim on 3 seeds "
                                f"({', '.join(decisive)})")
    reproduce.add_argument("--seeds", type=int, default=None,
                           help="seeds per configuration (default: the recipe's)")
    reproduce.add_argument("--workers", type=int, default=None,
                           help="parallel runs (default: the cores this process may use)")
    reproduce.add_argument("--executor", choices=("local", "ray"), default="local",
                           help="where the runs go: a process pool on this machine (default) "
                                "or Ray tasks (pip install 'normlab[ray]')")
    reproduce.add_argument("--address", default=None,
                           help="with --executor ray: the cluster to join ('auto': the one "
                                "`ray start` made on this node); default: a local Ray instance")
    reproduce.add_argument("--cpus-per-job", type=int, default=1,
                           help="with --executor ray: CPUs (torch threads) each run asks Ray for")
    reproduce.add_argument("--out", default=None,
                           help="folder for results.db, log.txt and report.md "
                                "(default: runs/RECIPE[-quick|-decisive]); rerunning resumes it")
    reproduce.add_argument("--data-dir", default=None,
                           help="dataset root (default: $NORMLAB_DATA, else ~/.cache/normlab)")
    reproduce.add_argument("--resume-from", metavar="EXPORTED", default=None,
                           help="an exported results folder (`normlab report --export`, e.g. "
                                "results/RECIPE/MODE) of the same recipe: its finished runs that "
                                "this sweep also runs are copied into --out and not run again")
    reproduce.add_argument("--checkpoint-every", metavar="SECONDS", type=float, default=300.0,
                           help="each training run saves its state into OUT/checkpoints this "
                                "often (default 300; 0: never), and a rerun continues it from "
                                "there")
    reproduce.set_defaults(run=cmd_reproduce)

    report = sub.add_parser("report", help="re-render report.md from a results folder")
    report.add_argument("dir", help="the --out folder of `normlab reproduce`, or an exported "
                                    "results folder")
    output = report.add_mutually_exclusive_group()
    output.add_argument("--csv", nargs="?", const="-", default=None, metavar="FILE",
                        help="instead of the report, every run as CSV, one row per evaluation "
                             "point (columns config.*, run.*, eval.*), written to FILE, or to "
                             "standard output without FILE (or with -)")
    output.add_argument("--export", metavar="DEST", default=None,
                        help="write the runs as runs.csv and meta.json to DEST (a results/ "
                             "folder) and render the report there, from them alone")
    report.add_argument("--commit", default=None, help="with --export: the commit the runs "
                                                       "ran on")
    report.add_argument("--machine", default=None, help="with --export: where they ran")
    report.add_argument("--date", default=None,
                        help="with --export: when they ran (default: today, UTC)")
    report.set_defaults(run=cmd_report)

    bench = sub.add_parser("bench", help="micro-benchmarks, as ratios against a baseline")
    bench.add_argument("--case", action="append", default=None, choices=list(CASES),
                       metavar="CASE",
                       help=f"a case to run (repeatable; default: all): {', '.join(CASES)}")
    bench.add_argument("--min-run-time", type=float, default=1.0,
                       help="seconds of timing per measurement")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --nproc-per-node reruns the command in each process
    from .data import DataError
    from .experiments.store import OutputError

    try:
        return args.run(args)
    except ValueError as err:  # bad input: one clear message, no traceback
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # a dataset a sweep needs (`train` says this in its check)
        print(f"normlab {args.command}: error: {err}; point --data-dir or $NORMLAB_DATA at a "
              f"folder that holds it", file=sys.stderr)
        return 2
    except OutputError as err:  # a results folder that is busy, unwritable or damaged
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a sweep (which says what it saved)
        print(f"normlab {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
