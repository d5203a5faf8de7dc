"""Plain records a task's data is made of; no torch, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["classification", "generation"]


@dataclass(frozen=True)
class Example:
    """One instance with the template already applied.

    Attributes:
        source: the full prompt the model reads (instruction + input + "Output: ").
        target: the one reference the model is trained on.
        references: every acceptable answer; scoring takes the best match over them.
    """

    source: str
    target: str
    references: tuple[str, ...]


@dataclass
class TaskData:
    """One task of a continual-learning sequence, split three ways.

    ``kind`` decides the metric: exact match for classification, Rouge-L for generation.
    ``val`` is carved from train (dev.json equals test.json in CL_Benchmark, so it is never used).
    ``labels`` is the task's label set where it has one (Long Sequence's labels.json, the embedded
    tasks' word lists); None for open answers (SuperNI), whatever the metric.
    """

    name: str
    kind: TaskKind
    instruction: str
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    labels: tuple[str, ...] | None = None
