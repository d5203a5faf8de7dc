"""Ray Datasets for one stage: the training stream and the evaluation items."""

from __future__ import annotations

import random

import ray.data

from sapt.data.types import TaskData
from sapt.methods.base import Stage


def train_dataset(tasks: list[TaskData], stage: Stage, seed: int, replay: list[dict] | None = None) -> ray.data.Dataset:
    """The stage's training examples, shuffled once here so every worker's shard mixes tasks.

    Args:
        replay: remembered items of earlier tasks ({"source", "target"}) mixed into the stream.
    """
    rows = [
        {"source": ex.source, "target": ex.target}
        for index in stage.train_tasks
        for ex in tasks[index].train
    ]
    rows += [{"source": r["source"], "target": r["target"]} for r in replay or []]
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


def validation_dataset(tasks: list[TaskData], stage: Stage) -> ray.data.Dataset:
    """Validation prompts of the stage's newest task (for its stored mean attention), read like eval."""
    newest = stage.train_tasks[-1]
    examples = tasks[newest].val or tasks[newest].train  # val_size 0: training inputs, never test
    rows = [{"task": newest, "item": i, "source": ex.source, "id": i} for i, ex in enumerate(examples)]
    return ray.data.from_items(rows or [{"task": newest, "item": -1, "source": "", "id": -1}])


def memory_dataset(rows: list[dict]) -> ray.data.Dataset:
    """Remembered inputs of earlier tasks ({"task", "source"}), small: every worker reads them all."""
    return ray.data.from_items([{"task": r["task"], "source": r["source"]} for r in rows])
