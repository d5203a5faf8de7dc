"""Routing diagnostics of methods with a shared attention: which blocks each task's inputs weight.

Fed per stage with the worker's attention summary; produces what results.json and MLflow show:
``routing_accuracy`` (share of test inputs whose largest weight is on their own task's block, 0-100),
``attention`` (T x T: row i = mean weights of task i's test inputs over the blocks after the last
task, the paper's Figure 3 right) and ``train_attention`` (row i = task i's stored mean attention
over blocks 1..i, measured on its validation inputs right after training it; Figure 3 left).
"""

from __future__ import annotations


class RoutingRecord:
    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.accuracy: list[float | None] = [None] * num_tasks  # after each stage, over tasks seen
        self.test: list[list[float] | None] = [None] * num_tasks
        self.train: list[list[float | None] | None] = [None] * num_tasks
        self.seen = False

    def add(self, row: int, attention: dict | None, names: list[str]) -> None:
        """Takes one stage's summary: {"tasks": {name: {"sum", "count", "own_block"}}, "remembered": [...]}."""
        if not attention:
            return
        self.seen = True
        stats = attention["tasks"]
        total = sum(s["count"] for s in stats.values())
        own = sum(s["own_block"] for s in stats.values())
        self.accuracy[row] = 100.0 * own / total if total else None
        self.test = [None] * self.num_tasks
        for name, s in stats.items():
            mean = [v / s["count"] for v in s["sum"]] if s["count"] else None
            self.test[names.index(name)] = mean + [None] * (self.num_tasks - len(mean)) if mean else None
        if attention.get("remembered") is not None:
            vector = attention["remembered"]
            self.train[row] = vector + [None] * (self.num_tasks - len(vector))

    def last_accuracy(self) -> float | None:
        known = [a for a in self.accuracy if a is not None]
        return known[-1] if known else None

    def results(self) -> dict:
        """The keys results.json gets (none for methods that do not route)."""
        if not self.seen:
            return {}
        return {
            "routing_accuracy": self.last_accuracy(),
            "routing_accuracy_per_stage": self.accuracy,
            "attention": self.test,
            "train_attention": self.train,
        }
