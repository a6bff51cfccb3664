"""Estimate the CPU-hours of a recipe's full (or decisive) protocol from measured step times.

For every distinct training configuration of the recipe's jobs in that mode
(learning rate and seed aside, which do not change the cost), times some
optimizer steps (median) and one evaluation pass on 1000 test samples in CPU seconds
(`time.process_time`, one thread), then sums steps x step time + evaluated
samples x time per sample over the jobs. Probes that train (onlinenorm's)
count through the configuration they train; other probes cost seconds and are
left out. An estimate: it leaves out data loading and start-up, and CPU time
measured on a loaded machine runs somewhat above a quiet one's.

    PYTHONPATH=src python tools/full_protocol_cost.py enorm equinorm [--data-dir DIR]
        [--protocol decisive] [--detail]  (one line per distinct configuration: training and
        evaluation hours)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from normlab import data, registry, training
from normlab.experiments import Probe, Settings, get_recipe
from normlab.experiments.recipes import onlinenorm

# probe function -> the TrainConfig its run trains
TRAINING_PROBES = {onlinenorm.batch_probe: onlinenorm.train_config}
EVAL_SAMPLES = 1000
STEPS = 20  # timed steps per configuration; their median is the step time
DATASET_SIZES = {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}


def train_configs(name: str, protocol: str = "full") -> list[training.TrainConfig]:
    recipe = get_recipe(name)
    settings = Settings(name, quick=False, seeds=recipe.seeds[protocol], dataset=recipe.dataset,
                        protocol=protocol)
    configs = []
    for job in recipe.jobs(settings):
        if isinstance(job, Probe):
            if job.fn in TRAINING_PROBES:
                configs.append(TRAINING_PROBES[job.fn](seed=job.seed, **job.params))
        else:
            configs.append(job)
    return configs


def signature(config: training.TrainConfig) -> str:
    cost_free = {"seed", "lr", "epochs", "eval_every", "train_limit", "test_limit",
                 "lr_schedule"}
    return json.dumps({k: v for k, v in config.to_dict().items() if k not in cost_free},
                      sort_keys=True, default=str)


def measure(config: training.TrainConfig, data_dir, steps: int = STEPS) -> tuple[float, float]:
    """(CPU seconds per optimizer step, CPU seconds per evaluated sample)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    task = training.TASKS[config.task]
    images, labels = training.load_split(config, "test", data_dir)
    model = training.build_model(config).to(training.DTYPES[config.dtype])
    optimizer = training.build_optimizer(model, config)
    _, rebalancer_name = training.split_norm(config.norm)
    rebalancer = (registry.get(rebalancer_name).rebalancer(model, optimizer, **config.rebalancer_kw)
                  if rebalancer_name else None)
    model.train()
    times = []
    for step in range(steps + 1):  # the first step warms up
        index = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
        start = time.process_time()
        inputs = images[index]
        if task.augment:
            inputs = training.random_crop_flip(inputs, generator)
        loss = F.cross_entropy(model(inputs).float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rebalancer is not None:
            rebalancer.step()
        if step:
            times.append(time.process_time() - start)
    start = time.process_time()
    training.evaluate(model, images[:EVAL_SAMPLES], labels[:EVAL_SAMPLES])
    return sorted(times)[len(times) // 2], (time.process_time() - start) / EVAL_SAMPLES


@dataclass
class Cost:
    """The full protocol's runs of one distinct configuration, and their CPU seconds."""

    config: training.TrainConfig  # the first of them
    runs: int = 0
    step_time: float = 0.0  # CPU seconds per optimizer step
    sample_time: float = 0.0  # CPU seconds per evaluated sample
    training: float = 0.0  # CPU seconds, all its runs' optimizer steps
    evaluation: float = 0.0  # CPU seconds, all its runs' evaluations


def costs(name: str, data_dir, steps: int = STEPS, protocol: str = "full") -> list[Cost]:
    """One `Cost` per distinct configuration of the recipe's full protocol."""
    by_signature: dict[str, Cost] = {}
    for config in train_configs(name, protocol):
        key = signature(config)
        if key not in by_signature:
            by_signature[key] = Cost(config)
            by_signature[key].step_time, by_signature[key].sample_time = measure(
                config, data_dir, steps)
        cost = by_signature[key]
        n_train, n_test = DATASET_SIZES[training.TASKS[config.task].dataset]
        steps_per_epoch = math.ceil((config.train_limit or n_train) / config.batch_size)
        run_steps = steps_per_epoch * config.epochs
        evals = math.ceil(run_steps / (config.eval_every or steps_per_epoch))
        cost.runs += 1
        cost.training += run_steps * cost.step_time
        cost.evaluation += evals * (config.test_limit or n_test) * cost.sample_time
    return list(by_signature.values())


def describe(config: training.TrainConfig, reference: training.TrainConfig) -> str:
    """What sets `config` apart from `reference` (norm, dtype, batch, ...), briefly."""
    own, other = config.to_dict(), reference.to_dict()
    differing = [k for k in own if own[k] != other[k] and k not in ("seed", "lr")]
    return ", ".join(f"{k}={own[k]}" for k in ["norm"] + [k for k in differing if k != "norm"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"optimizer steps timed per configuration (median; default {STEPS})")
    parser.add_argument("--protocol", choices=("full", "decisive"), default="full")
    parser.add_argument("--detail", action="store_true",
                        help="one line per distinct configuration: where the hours go")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data.load("mnist", "test", root=args.data_dir)  # fail early without the data
    for name in args.recipes:
        rows = costs(name, args.data_dir, args.steps, args.protocol)
        training_h = sum(c.training for c in rows) / 3600
        evaluation_h = sum(c.evaluation for c in rows) / 3600
        print(f"{name}: {sum(c.runs for c in rows)} training runs, about "
              f"{training_h + evaluation_h:.0f} CPU-hours (one thread): "
              f"{training_h:.1f} training, {evaluation_h:.1f} evaluating", flush=True)
        if args.detail:
            for c in rows:
                print(f"  {c.runs:4d} runs, {describe(c.config, rows[0].config)}: "
                      f"step {c.step_time * 1e3:.2f} ms, evaluation "
                      f"{c.sample_time * 1e6:.1f} us/sample; {c.training / 3600:.2f} h training,"
                      f" {c.evaluation / 3600:.2f} h evaluating", flush=True)


if __name__ == "__main__":
    main()
