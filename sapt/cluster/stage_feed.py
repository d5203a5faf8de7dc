"""The line between the driver and a sequence's one Ray Train worker group.

A worker group lives for a whole sequence (its start-up costs tens of seconds: processes, imports,
the process group), while the driver scores, registers and remembers between stages. So the driver
posts each stage's inputs here, the workers pick them up and train, and rank 0 says when the stage's
final checkpoint (``worker.checkpoint_dir_name``) is reported. The feed makes each stage's dataset shards as Ray Train's own dataset
manager does (``DataConfig.configure``: the training stream split across ranks, the rest read whole
by every rank), once per worker group: a group that Ray Train restarts after a failure gets fresh
shards of the stage it resumes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
import ray.train
from ray.data import DataContext, Dataset, ExecutionOptions


@ray.remote(num_cpus=0)
class StageFeed:
    def __init__(self, world_size: int, datasets_to_split: list[str]):
        context = DataContext.get_current()  # as the driver's: no per-dataset progress bars
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        self._world_size = world_size
        # Ray Train's default ingest options copy the deprecated ``exclude_resources`` (a warning per
        # stage); the same options without it.
        current = context.execution_options
        options = ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                                   verbose_progress=current.verbose_progress)
        self._data_config = ray.train.DataConfig(datasets_to_split=datasets_to_split, execution_options=options)
        self._stages: dict[int, tuple[dict[str, Any], dict[str, Dataset]]] = {}
        self._shards: dict[tuple[int, str], list[dict]] = {}  # (stage, worker group) -> per-rank iterators
        self._done: set[int] = set()  # stages whose final checkpoint is reported
        self._progress: dict[int, dict[str, dict]] = {}  # stage -> phase -> rank 0's newest snapshot
        self._workers: dict[str, Any] = {}  # actor id -> handle of every worker that asked for a stage
        self._closed = False
        self._changed = asyncio.Condition()

    async def post_stage(self, number: int, inputs: dict[str, Any], datasets: dict[str, Dataset]) -> None:
        """The driver: stage ``number``'s plain-JSON inputs and its Ray Datasets."""
        async with self._changed:
            self._stages[number] = (inputs, datasets)
            for key in [k for k in self._shards if k[0] < number]:  # finished stages' split coordinators go
                del self._shards[key]
            self._changed.notify_all()

    async def take_stage(self, number: int, group: str, rank: int, worker_id: str, worker: Any) -> dict[str, Any] | None:
        """A worker: waits for stage ``number``; returns its inputs with this rank's dataset iterators
        under ``"shards"``, or None once the driver has closed the feed (the sequence is over)."""
        self._workers[worker_id] = worker
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or number in self._stages)
            if self._closed:
                return None
            inputs, datasets = self._stages[number]
            key = (number, group)
            if key not in self._shards:
                self._shards[key] = self._data_config.configure(datasets, world_size=self._world_size,
                                                                worker_handles=None, worker_node_ids=None)
            return {**inputs, "shards": self._shards[key][rank]}

    async def post_progress(self, number: int, snapshot: dict) -> None:
        """Rank 0: where stage ``number`` is in one phase (steps or items done, loss...); the newest
        of each phase is kept."""
        self._progress.setdefault(number, {})[snapshot["phase"]] = snapshot

    async def progress(self, number: int) -> dict[str, dict]:
        """The driver: stage ``number``'s newest snapshot of each phase so far, in the order they began
        (a phase shorter than the driver's polling interval is not missed)."""
        return self._progress.get(number, {})

    async def post_done(self, number: int) -> None:
        """Rank 0: stage ``number`` is done and its final checkpoint reported (a restarted group may
        say so again)."""
        async with self._changed:
            self._done.add(number)
            self._changed.notify_all()

    async def wait_done(self, number: int) -> None:
        """The driver: waits until stage ``number`` is done."""
        async with self._changed:
            await self._changed.wait_for(lambda: number in self._done)

    async def close(self) -> list[Any]:
        """The driver: no more stages. Waiting workers end; returns every worker's handle, for the
        driver to stop a group still busy when the driver gives up."""
        async with self._changed:
            self._closed = True
            self._shards.clear()
            self._changed.notify_all()
        return list(self._workers.values())
