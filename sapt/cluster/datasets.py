"""Ray Datasets for one stage: the training stream and the evaluation items."""

from __future__ import annotations

import random

import ray.data

from sapt.data.types import TaskData
from sapt.methods.base import Stage


def train_dataset(tasks: list[TaskData], stage: Stage, seed: int) -> ray.data.Dataset:
    """The stage's training examples, shuffled once here so every worker's shard mixes tasks."""
    rows = [
        {"source": ex.source, "target": ex.target}
        for index in stage.train_tasks
        for ex in tasks[index].train
    ]
    random.Random(seed * 1000 + stage.row).shuffle(rows)
    return ray.data.from_items(rows)


def eval_dataset(tasks: list[TaskData], stage: Stage) -> ray.data.Dataset:
    """Test prompts of the tasks scored after this stage, sorted by length to pad less.

    Every worker reads this dataset whole and keeps the rows where ``id % world_size == rank``,
    so no item is dropped to even out shards.
    """
    rows = [
        {"task": index, "item": item, "source": ex.source}
        for index in stage.eval_tasks
        for item, ex in enumerate(tasks[index].test)
    ]
    rows.sort(key=lambda r: len(r["source"]))
    for position, row in enumerate(rows):
        row["id"] = position
    return ray.data.from_items(rows)
