"""Ray Datasets for one stage: the training stream and the evaluation items."""

from __future__ import annotations

import random

import ray.data

from sapt.data.types import TaskData
from sapt.methods.base import Stage


def train_dataset(tasks: list[TaskData], stage: Stage, seed: int, replay: list[dict] | None = None) -> ray.data.Dataset:
    """The stage's training examples, shuffled once here so every worker's shard mixes tasks.

    Each row carries its task index and whether it is a remembered item (``memory``), which the
    workers hand to ``Method.loss`` with the batch.

    Args:
        replay: remembered items of earlier tasks ({"task", "source", "target"}) mixed into the stream.
    """
    rows = [
        {"task": index, "memory": False, "source": ex.source, "target": ex.target}
        for index in stage.train_tasks
        for ex in tasks[index].train
    ]
    rows += [{"task": r["task"], "memory": True, "source": r["source"], "target": r["target"]} for r in replay or []]
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


def post_task_dataset(tasks: list[TaskData], stage: Stage, split: str) -> ray.data.Dataset:
    """Inputs (and answers) of the stage's newest task for the method's post-task pass, read like eval.

    Args:
        split: ``val`` (the validation items; the training items when ``val_size`` is 0, never
            test) or ``train``.
    """
    newest = stage.train_tasks[-1]
    examples = tasks[newest].train if split == "train" else (tasks[newest].val or tasks[newest].train)
    rows = [{"task": newest, "item": i, "source": ex.source, "target": ex.target, "id": i}
            for i, ex in enumerate(examples)]
    return ray.data.from_items(rows or [{"task": newest, "item": -1, "source": "", "target": "", "id": -1}])


def memory_dataset(rows: list[dict]) -> ray.data.Dataset:
    """Remembered items of earlier tasks ({"task", "source", "target"}; the target is empty for
    inputs-only memory). Every worker reads them all."""
    return ray.data.from_items([{"task": r["task"], "source": r["source"], "target": r.get("target", "")}
                                for r in rows])
