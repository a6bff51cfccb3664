"""Per-job overhead of the sweep executors: Ray tasks against the local process pool.

    PYTHONPATH=src python tools/sweep_overhead.py [--jobs 20 220] [--slots 2] [--repeats 3]

Each sweep runs jobs that do nothing (a probe returning one point) through
`run_sweep` into a fresh results database, so its wall time is the executor's
and the driver's bookkeeping alone. The per-job figure is the slope
(T(N2) - T(N1)) / (N2 - N1) over the two sweep sizes, which cancels each
executor's start-up (spawning the pool's workers; Ray's instance starts once
and is shared, its own start-up printed apart). Both executors get `slots`
jobs at a time. Sizes alternate, executors alternate, the median of the
repeats is reported: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from normlab.experiments import LocalPool, Probe, RayCluster, Store, run_sweep


def nothing(seed: int) -> list[dict]:
    return [{"value": seed}]


def timed_sweep(executor, count: int) -> float:
    jobs = [Probe(nothing, seed) for seed in range(count)]
    with tempfile.TemporaryDirectory() as folder, Store.in_folder(folder) as store:
        start = time.perf_counter()
        run_sweep(jobs, store, executor=executor, stream=open("/dev/null", "w"))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs=2, default=(20, 220))
    parser.add_argument("--slots", type=int, default=2, help="jobs at a time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.slots, include_dashboard=False)
    print(f"Ray local instance start-up: {time.perf_counter() - start:.1f} s")
    executors = {"local pool": lambda: LocalPool(args.slots), "ray": RayCluster}
    timed_sweep(RayCluster(), args.slots)  # starts Ray's workers once, as a cluster has them
    slopes: dict[str, list[float]] = {name: [] for name in executors}
    small, large = args.jobs
    for _ in range(args.repeats):
        for name, make in executors.items():
            times = {count: timed_sweep(make(), count) for count in (small, large)}
            slopes[name].append((times[large] - times[small]) / (large - small))
            print(f"{name}: {small} jobs {times[small]:.2f} s, {large} jobs {times[large]:.2f} s")
    ray.shutdown()
    medians = {name: statistics.median(values) for name, values in slopes.items()}
    for name, value in medians.items():
        print(f"{name}: {1000 * value:.1f} ms per job (median of {args.repeats}; "
              f"all: {', '.join(f'{1000 * v:.1f}' for v in slopes[name])})")
    print(f"ray / local pool: {medians['ray'] / medians['local pool']:.2f}x per job")


if __name__ == "__main__":
    main()
