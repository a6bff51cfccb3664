"""The lab: datasets, models, training, benchmarks, reproductions and the `normlab` command.

It imports the library (normlab's layers and what acts on them), never the reverse;
its dependencies (matplotlib, tqdm) come with the ``normlab[lab]`` extra.
"""
