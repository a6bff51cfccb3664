"""Estimate the CPU-hours of a recipe's full protocol from measured step times.

For every distinct training configuration of the recipe's full-mode jobs
(learning rate and seed aside, which do not change the cost), times a few
optimizer steps and one evaluation pass on 1000 test samples in CPU seconds
(`time.process_time`, one thread), then sums steps x step time + evaluated
samples x time per sample over the jobs. Probes that train (onlinenorm's)
count through the configuration they train; other probes cost seconds and are
left out. An estimate: it leaves out data loading and start-up, and CPU time
measured on a loaded machine runs somewhat above a quiet one's.

    PYTHONPATH=src python tools/full_protocol_cost.py enorm equinorm [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.nn import functional as F

from normlab import data, registry, training
from normlab.experiments import Probe, Settings, get_recipe
from normlab.experiments.recipes import onlinenorm

# probe function -> the TrainConfig its run trains
TRAINING_PROBES = {onlinenorm.batch_probe: onlinenorm.train_config}
EVAL_SAMPLES = 1000
DATASET_SIZES = {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}


def train_configs(name: str) -> list[training.TrainConfig]:
    recipe = get_recipe(name)
    settings = Settings(name, quick=False, seeds=recipe.seeds[1], dataset=recipe.dataset)
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


def measure(config: training.TrainConfig, data_dir, steps: int = 3) -> tuple[float, float]:
    """(CPU seconds per optimizer step, CPU seconds per evaluated sample)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    task = training.TASKS[config.task]
    images, labels = training.load_split(config, "test", data_dir)
    model = training.build_model(config).to(training.DTYPES[config.dtype])
    optimizer = training.build_optimizer(model, config)
    _, rebalancer_name = training.split_norm(config.norm)
    rebalancer = (registry.get(rebalancer_name).build(model, optimizer, **config.rebalancer_kw)
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


def cpu_hours(name: str, data_dir) -> tuple[int, float]:
    configs = train_configs(name)
    measured: dict[str, tuple[float, float]] = {}
    total = 0.0
    for config in configs:
        key = signature(config)
        if key not in measured:
            measured[key] = measure(config, data_dir)
        step_time, sample_time = measured[key]
        n_train, n_test = DATASET_SIZES[training.TASKS[config.task].dataset]
        steps_per_epoch = math.ceil((config.train_limit or n_train) / config.batch_size)
        steps = steps_per_epoch * config.epochs
        evals = math.ceil(steps / (config.eval_every or steps_per_epoch))
        total += steps * step_time + evals * (config.test_limit or n_test) * sample_time
    return len(configs), total / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data.load("mnist", "test", root=args.data_dir)  # fail early without the data
    for name in args.recipes:
        runs, hours = cpu_hours(name, args.data_dir)
        print(f"{name}: {runs} training runs, about {hours:.0f} CPU-hours (one thread)",
              flush=True)


if __name__ == "__main__":
    main()
