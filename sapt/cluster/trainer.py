"""Driver side of a sequence: one TorchTrainer whose workers train stage after stage, fed by the driver.

The worker group starts once per sequence (``worker.train_sequence``); the driver posts each stage's
Ray Datasets and initial state to a ``StageFeed`` and waits for the stage's final checkpoint, which
it copies out of the Train run (Ray Train keeps only the newest two) as the task's kept checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from sapt.cluster import worker
from sapt.cluster.datasets import eval_dataset, memory_dataset, post_task_dataset, train_dataset
from sapt.cluster.stage_feed import StageFeed
from sapt.config import RunConfig
from sapt.data.types import TaskData
from sapt.errors import SaptError
from sapt.methods.base import MemorySpec, Stage, task_infos

log = logging.getLogger(__name__)

STOP_WAIT_S = 30  # how long a closed feed waits for the workers to end before it stops them


@dataclass
class StageResult:
    checkpoint_path: str  # the stage's kept final checkpoint: method state for the next stage
    predictions: dict[str, list[str]]  # task name -> one answer per test item
    history: list[dict]  # per-epoch training stats
    attention: dict | None  # routing diagnostics of methods that route (worker.ATTENTION_FILE)
    generator_path: str | None  # ARM: the newest task's pseudo-sample generator (a PEFT adapter folder)
    generator_training: dict | None = None  # ARM: its steps, seconds and losses (worker.GENERATOR_FILE)


class SequenceTrainer:
    """One Ray Train run (2+ DeepSpeed workers) for the stages of a sequence from ``first`` on.

    Use as a context manager; ``run_stage`` for each stage in order. Leaving the block ends the
    worker group: at once when it waits for a stage, after ``STOP_WAIT_S`` by force otherwise.

    Args:
        storage_path, name: where Ray Train keeps the run's checkpoints. V2 resumes a run of the
            same (storage_path, name) from its newest checkpoint, which is what a worker group
            replaced after a failure, or a ``--resume`` of the same point, continues from.
        first: the number (0-based, in ``Method.stages``) of the first stage this run trains.
        keep_as: stage results are kept as ``storage_path/{keep_as}-after-tNN`` (NN: the matrix row).
        memory, post_task_split: the method's memory spec and its post-task pass's split.
        on_progress: called about once a second during a stage with rank 0's newest snapshot
            (``{"event": "work", "phase": "train" | "eval" | "generator", "done", "total", ...}``).
    """

    def __init__(self, run: RunConfig, tasks: list[TaskData], *, storage_path: str, name: str, first: int,
                 keep_as: str, memory: MemorySpec | None = None, post_task_split: str | None = None,
                 on_progress: Callable[[dict], None] | None = None):
        worker.quiet_ray_data()
        if "://" not in storage_path:
            storage_path = str(Path(storage_path).resolve())  # Ray Train rejects relative local paths
        self.run, self.tasks, self.storage_path, self.name, self.keep_as = run, tasks, storage_path, name, keep_as
        self.memory, self.post_task_split, self.on_progress = memory, post_task_split, on_progress
        self.feed = StageFeed.remote(run.num_workers, ["train"])
        # Ray Train waits this long for the workers' placement group, then (controller_failure_limit 0)
        # fails instead of asking again forever. It reads the setting from the driver's environment.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(run.ray.resource_wait_s)
        self.trainer = TorchTrainer(
            worker.train_sequence,
            train_loop_config={
                "run": run.model_dump(mode="json"),  # plain dicts survive Ray's copies; re-validated there
                "tasks": [info.to_dict() for info in task_infos(tasks)],
                "first": first,
                "feed": self.feed,
            },
            torch_config=TorchConfig(backend="nccl" if run.ray.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=run.num_workers,
                use_gpu=run.ray.use_gpu,
                resources_per_worker={"CPU": run.ray.cpus_per_worker, **({"GPU": 1} if run.ray.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=ray.train.FailureConfig(max_failures=run.ray.max_failures, controller_failure_limit=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name=f"ray-train-{name}", daemon=True)

    def _fit(self) -> None:
        try:  # off the main thread Ray Train installs no SIGINT handler; the driver's Ctrl-C ends the process
            self.trainer.fit()
        except BaseException as err:  # handed to the driver at its next wait
            self._error = err

    def __enter__(self) -> SequenceTrainer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        workers = ray.get(self.feed.close.remote())
        self._thread.join(timeout=STOP_WAIT_S)
        if self._thread.is_alive():  # the driver gave up mid-stage: stop the group, not only the loop
            log.warning("stopping the Ray Train workers of %s", self.name)
            for handle in workers:
                ray.kill(handle, no_restart=True)
            self._thread.join(timeout=STOP_WAIT_S)
        if exc[0] is None and self._error is not None:
            raise self._error

    def run_stage(self, number: int, stage: Stage, *, init_state: str | None, memory_rows: list[dict] | None = None,
                  needs_memory: bool = False) -> StageResult:
        """Trains and evaluates stage ``number`` on the workers; returns once its checkpoint is kept.

        Args:
            init_state: the previous stage's kept checkpoint path (None to start from the backbone).
            memory_rows: what the method holds of earlier tasks: replayed items join the training
                stream, reflected inputs and balanced-batch items go to every worker whole.
            needs_memory: a later stage will want this stage's task remembered (train its generator).
        """
        ray.get(self.feed.post_stage.remote(number, {
            "stage": stage.to_dict(), "init_state": init_state, "needs_memory": needs_memory,
        }, self._datasets(stage, memory_rows)))
        pending = self.feed.wait_done.remote(number)
        shown: dict[str, dict] = {}
        while not ray.wait([pending], timeout=1.0)[0]:
            if not self._thread.is_alive():
                raise self._no_workers() or self._error or RuntimeError(
                    f"the Ray Train run {self.name} ended before stage {number + 1}")
            self._show_progress(number, shown)
        ray.get(pending)
        self._show_progress(number, shown)  # the stage's last steps
        final = f"{self.storage_path.rstrip('/')}/{self.name}/{worker.checkpoint_dir_name(number, None)}"
        kept = keep_checkpoint(final, self.storage_path, f"{self.keep_as}-after-t{stage.row + 1:02d}")
        with ray.train.Checkpoint(kept).as_directory() as directory:
            predictions = json.loads((Path(directory) / worker.PREDICTIONS_FILE).read_text())
            history = json.loads((Path(directory) / worker.HISTORY_FILE).read_text())
            attention_file = Path(directory) / worker.ATTENTION_FILE
            attention = json.loads(attention_file.read_text()) if attention_file.exists() else None
            generator_file = Path(directory) / worker.GENERATOR_FILE
            generator_training = json.loads(generator_file.read_text()) if generator_file.exists() else None
        generator = Path(kept) / worker.GENERATOR_DIR
        return StageResult(checkpoint_path=kept, predictions=predictions, history=history, attention=attention,
                           generator_path=str(generator) if generator.is_dir() else None,
                           generator_training=generator_training)

    def _show_progress(self, number: int, shown: dict[str, dict]) -> None:
        """Hands ``on_progress`` each phase's snapshot that changed since the last call (``shown``)."""
        if self.on_progress is None:
            return
        for phase, snapshot in ray.get(self.feed.progress.remote(number)).items():
            if shown.get(phase) != snapshot:
                shown[phase] = snapshot
                self.on_progress(snapshot)

    def _no_workers(self) -> SaptError | None:
        """The run's failure as a clear message when it was the wait for the workers' resources."""
        cause = getattr(self._error, "controller_failure", None)
        if type(cause).__name__ != "WorkerGroupStartupTimeoutError":
            return None
        run = self.run
        each = f"{run.ray.cpus_per_worker:g} CPU" + (" + 1 GPU" if run.ray.use_gpu else "")
        return SaptError(f"Ray gave no {run.num_workers} workers x ({each}) within {run.ray.resource_wait_s:g} s: "
                         "the cluster lacks them (or its new nodes start slower)", source="config",
                         field="ray.resource_wait_s")

    def _datasets(self, stage: Stage, memory_rows: list[dict] | None) -> dict[str, ray.data.Dataset]:
        memory, run, tasks = self.memory, self.run, self.tasks
        # Replayed items join the stream, except for balanced batches: those draw them from the memory
        # dataset that every worker reads whole, like reflected inputs.
        replay = memory_rows if memory is not None and memory.use == "replay" and memory.mix == "shuffle" else None
        datasets = {
            "train": train_dataset(tasks, stage, run.seed, replay=replay),
            "eval": eval_dataset(tasks, stage),
        }
        if self.post_task_split is not None:
            datasets["post_task"] = post_task_dataset(tasks, stage, self.post_task_split)
        if memory is not None and (memory.use == "reflect" or memory.mix == "balanced") and memory_rows:
            datasets["memory"] = memory_dataset(memory_rows)
        return datasets


def keep_checkpoint(checkpoint_path: str, storage_path: str, name: str) -> str:
    """Copies a stage's final checkpoint beside the Train run (which deletes all but its newest two)
    as ``storage_path/name``; returns the copy's path."""
    return _copy_to_storage(checkpoint_path, storage_path, name)


@contextlib.contextmanager
def local_state(checkpoint_path: str) -> Iterator[Path]:
    """The method state inside a stage's final checkpoint, as a local folder (downloaded when the
    storage is remote, for as long as the block runs)."""
    with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
        yield Path(directory) / worker.STATE_DIR


def place_state(local_state_dir: Path, storage_path: str, name: str) -> str:
    """Puts a method state from the driver where every worker reads stage inputs (the storage path);
    returns the path to pass as a stage's ``init_state``."""
    return _copy_to_storage(str(local_state_dir), storage_path, name, into=worker.STATE_DIR)


def _copy_to_storage(source: str, storage_path: str, name: str, into: str = "") -> str:
    """Copies folder ``source`` to ``storage_path/name[/into]`` (replacing what was there), on local
    or remote (pyarrow) storage; returns ``storage_path/name``."""
    if "://" not in storage_path:
        target = Path(storage_path).resolve() / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target / into)
        return str(target)
    import pyarrow.fs

    target = f"{storage_path.rstrip('/')}/{name}"
    pyarrow.fs.copy_files(source, f"{target}/{into}" if into else target)
    return target
