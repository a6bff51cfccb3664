"""The `normlab` command: list | train | reproduce | report | bench."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

from .. import registry
from .text import text_table


def cmd_list(args) -> int:
    rows = [(m.name, m.family, m.paper, m.summary)
            for m in map(registry.get, registry.available())]
    print(text_table(("name", "family", "paper", "what it does"), rows))
    return 0


def cmd_train(args) -> int:
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker that torchrun started
        return _train_in_process_group(args)
    if args.nproc_per_node > 1:
        return _launch(args.nproc_per_node, args.argv)
    return _train(args, report=True)


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
        return _train(args, report=dist.get_rank() == 0)
    finally:
        dist.destroy_process_group()


def _train(args, report: bool) -> int:
    from . import data, training

    task = args.task
    if args.fallback_digits and task == "mnist-mlp":
        try:
            data.load("mnist", "test", root=args.data_dir)
        except data.DataError as err:
            print(f"MNIST unavailable ({err}); falling back to the digits dataset "
                  f"that ships with scikit-learn.")
            task = "digits-mlp"
    norms = args.norm.split(",")
    if args.rebalancer_kw and not any(training.split_norm(norm)[1] for norm in norms):
        raise ValueError("--rebalancer-kw needs a rebalancer in --norm, e.g. enorm or batch+enorm")
    results = []
    for norm in norms:
        rebalancer_kw = dict(args.rebalancer_kw) if training.split_norm(norm)[1] else {}
        config = training.TrainConfig(task=task, norm=norm, lr=args.lr, epochs=args.epochs,
                                      batch_size=args.batch_size, seed=args.seed,
                                      momentum=args.momentum, weight_decay=args.weight_decay,
                                      rebalancer_kw=rebalancer_kw)
        # a bar on a terminal; elsewhere (a cluster job's log, | tee) a line per evaluation
        on_terminal = sys.stderr.isatty()
        show = report and not args.quiet
        result = training.train(config, data_dir=args.data_dir,
                                progress=show and on_terminal,
                                on_eval=_print_eval(f"{task} {norm}") if show and not on_terminal
                                else None)
        results.append(result)
        if args.out and report:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{task}-{norm}-seed{args.seed}.json"
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

    out = args.out or f"runs/{args.recipe}{'-quick' if args.quick else ''}"
    if args.executor == "ray":
        local = args.address is None
        if args.workers is not None and not local:
            raise ValueError("--workers sizes the local pool or a local Ray instance; a Ray "
                             "cluster runs as many jobs as its CPUs allow")
        executor = experiments.RayCluster(
            args.address, cpus_per_job=args.cpus_per_job,
            num_cpus=args.workers * args.cpus_per_job if args.workers and local else None)
    elif args.address is not None or args.cpus_per_job != 1:
        raise ValueError("--address and --cpus-per-job apply to --executor ray")
    else:
        executor = experiments.LocalPool(args.workers)
    try:
        path = experiments.reproduce(args.recipe, out, quick=args.quick, seeds=args.seeds,
                                     data_dir=args.data_dir, executor=executor,
                                     resume_from=args.resume_from)
    except experiments.Interrupted as err:
        print(f"normlab reproduce: interrupted ({err}); finished runs are saved in {out}; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    print(f"report: {path}")
    return 0


def cmd_report(args) -> int:
    from . import experiments

    if args.csv:
        sys.stdout.write(experiments.runs_csv(args.dir))
        return 0
    if args.export:
        if not args.commit or not args.machine:
            raise ValueError("--export needs --commit (the code the runs ran on) and "
                             "--machine (where they ran)")
        path = experiments.export(args.dir, args.export, args.commit, args.machine, args.date)
        print(f"report: {path}")
        return 0
    print(f"report: {experiments.render(args.dir)}")
    return 0


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

    rows = bench.run(args.case, min_run_time=args.min_run_time)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(bench.format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
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

    reproduce = sub.add_parser("reproduce", help="rerun a paper's experiment and report it, "
                                                 "claim by claim")
    reproduce.add_argument("recipe",
                           help="fastnorm, lecture, enorm, equinorm or onlinenorm")
    reproduce.add_argument("--quick", action="store_true",
                           help="a cut-down protocol that finishes in minutes")
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
                                "(default: runs/RECIPE[-quick]); rerunning resumes it")
    reproduce.add_argument("--data-dir", default=None,
                           help="dataset root (default: $NORMLAB_DATA, else ~/.cache/normlab)")
    reproduce.add_argument("--resume-from", metavar="EXPORTED", default=None,
                           help="an exported results folder (`normlab report --export`, e.g. "
                                "results/RECIPE/...) of the same settings: its finished runs "
                                "are copied into --out and not run again")
    reproduce.set_defaults(run=cmd_reproduce)

    report = sub.add_parser("report", help="re-render report.md from a results folder")
    report.add_argument("dir", help="the --out folder of `normlab reproduce`, or an exported "
                                    "results folder")
    report.add_argument("--csv", action="store_true", help="print every run as CSV instead")
    report.add_argument("--export", metavar="DEST", default=None,
                        help="write the runs as runs.csv and meta.json to DEST (a results/ "
                             "folder) and render the report there, from them alone")
    report.add_argument("--commit", default=None, help="with --export: the commit the runs "
                                                       "ran on")
    report.add_argument("--machine", default=None, help="with --export: where they ran")
    report.add_argument("--date", default=None,
                        help="with --export: when they ran (default: today, UTC)")
    report.set_defaults(run=cmd_report)

    bench = sub.add_parser("bench", help="micro-benchmarks, as ratios against a baseline")
    bench.add_argument("--case", action="append", default=None,
                       help="a case to run (repeatable; default: all)")
    bench.add_argument("--min-run-time", type=float, default=1.0,
                       help="seconds of timing per measurement")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .experiments.store import OutputError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --nproc-per-node reruns the command in each process
    try:
        return args.run(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OutputError as err:  # a results folder that is busy, unwritable or damaged
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
