"""One epoch of training on a DeepSpeed engine: batches in, loss curve and throughput out."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from sapt.methods.base import MEMORY_KEY


@dataclass
class EpochStats:
    steps: int = 0
    tokens: int = 0
    items: int = 0  # training items seen
    memory_items: int = 0  # of which remembered items of earlier tasks (replay)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)  # the method's extra loss terms
    stopped: bool = False  # should_stop ended the epoch before its batches did

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_epoch(
    engine,
    method,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    log_every: int,
    on_log: Callable[[int, float, float], None],
    reflect: Callable[[], dict[int, dict[str, torch.Tensor]]] | None = None,
    max_steps: int | None = None,
    should_stop: Callable[[float], bool] | None = None,
) -> EpochStats:
    """Runs ``method.loss`` + backward + step over ``batches`` (micro-batches).

    Args:
        on_log: called every ``log_every`` micro-batches with (step, mean recent loss, tokens/s).
        reflect: draws, per micro-batch, one batch of remembered inputs per earlier task.
        max_steps: stop after this many micro-batches.
        should_stop: called with each micro-batch's loss; True ends the epoch after that step
            (``stopped`` is then set). It must answer alike on every rank.
    """
    engine.train()
    stats = EpochStats()
    recent: list[float] = []
    start = time.perf_counter()
    for batch in batches:
        if max_steps is not None and stats.steps >= max_steps:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        memory = None
        if reflect is not None:
            memory = {task: {k: v.to(device) for k, v in b.items()} for task, b in reflect().items()}
        loss, extra = method.loss(engine, batch, memory)
        engine.backward(loss)
        engine.step()
        stats.steps += 1
        # Tokens the model actually reads and predicts, padding excluded.
        stats.tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] >= 0).sum())
        stats.items += int(batch["input_ids"].shape[0])
        if MEMORY_KEY in batch:
            stats.memory_items += int(batch[MEMORY_KEY].sum())
        value = float(loss.detach())
        stats.losses.append(value)
        for key, term in extra.items():
            stats.terms.setdefault(key, []).append(term)
        recent.append(value)
        if stats.steps % log_every == 0:
            elapsed = time.perf_counter() - start
            on_log(stats.steps, sum(recent) / len(recent), stats.tokens / elapsed if elapsed else 0.0)
            recent.clear()
        if should_stop is not None and should_stop(value):
            stats.stopped = True
            break
    stats.seconds = time.perf_counter() - start
    return stats
