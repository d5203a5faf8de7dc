"""Balanced replay batches (ConPET's dynamic replay sampler, baselines.md 1.2): a fixed share of each
batch comes from memory, drawn task-uniformly (an earlier task first, then one of its items), so
replay does not follow the tasks' sizes and a batch costs the same whatever the number of tasks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any


class BalancedMix:
    """Adds remembered items to batches of new ones.

    Args:
        memory: earlier task index -> its remembered items (any row type).
        batch_size: items per batch, new and old together.
        old_share: share of each batch drawn from memory (ConPET: 0.5, a 1:1 ratio).
        rng: the random source of the draws (checkpointed with the rest of the random state).
    """

    def __init__(self, memory: Mapping[int, Sequence[Any]], *, batch_size: int, old_share: float, rng: random.Random):
        self.memory = {task: list(items) for task, items in sorted(memory.items()) if items}
        if not self.memory:
            raise ValueError("balanced batches need remembered items of at least one earlier task")
        self.tasks = sorted(self.memory)
        self.old_per_batch = min(batch_size - 1, max(1, round(batch_size * old_share)))
        self.new_per_batch = batch_size - self.old_per_batch
        self.rng = rng

    def draw_old(self) -> list[tuple[int, Any]]:
        """One batch's remembered (task, item) pairs: for each slot a uniformly chosen task, then one of
        its items."""
        out = []
        for _ in range(self.old_per_batch):
            task = self.rng.choice(self.tasks)
            out.append((task, self.rng.choice(self.memory[task])))
        return out
