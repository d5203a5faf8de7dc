"""Driver side of one stage: a TorchTrainer over Ray Datasets, and what its final checkpoint holds."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from sapt.cluster import worker
from sapt.cluster.datasets import eval_dataset, memory_dataset, post_task_dataset, train_dataset
from sapt.config import RunConfig
from sapt.data.types import TaskData
from sapt.methods.base import MemorySpec, Stage


@dataclass
class StageResult:
    checkpoint_path: str  # the final checkpoint: method state for the next stage
    predictions: dict[str, list[str]]  # task name -> one answer per test item
    history: list[dict]  # per-epoch training stats
    attention: dict | None  # routing diagnostics of methods that route (worker.ATTENTION_FILE)
    generator_path: str | None  # ARM: the newest task's pseudo-sample generator (a PEFT adapter folder)


def fit_stage(
    run: RunConfig, stage: Stage, tasks: list[TaskData], *, init_state: str | None, storage_path: str, name: str,
    memory: MemorySpec | None = None, memory_rows: list[dict] | None = None, needs_memory: bool = False,
    post_task_split: str | None = None,
) -> StageResult:
    """Trains and evaluates one stage on Ray Train workers running DeepSpeed.

    Args:
        init_state: the previous stage's final checkpoint path (None to start from the backbone).
        storage_path, name: where Ray Train keeps this stage's checkpoints. Each stage gets its own
            name: V2 resumes a run of the same (storage_path, name) from its latest checkpoint.
        memory, memory_rows: the method's memory spec and what it holds of earlier tasks: replayed
            items join the training stream, reflected inputs go to every worker whole.
        needs_memory: a later stage will want this stage's task remembered (train its generator).
        post_task_split: the newest task's split that the method's post-task pass reads, if any.
    """
    worker.quiet_ray_data()
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())  # Ray Train rejects relative local paths
    # Replayed items join the stream, except for balanced batches: those draw them from the memory
    # dataset that every worker reads whole, like reflected inputs.
    replay = memory_rows if memory is not None and memory.use == "replay" and memory.mix == "shuffle" else None
    datasets = {
        "train": train_dataset(tasks, stage, run.seed, replay=replay),
        "eval": eval_dataset(tasks, stage),
    }
    if post_task_split is not None:
        datasets["post_task"] = post_task_dataset(tasks, stage, post_task_split)
    if memory is not None and (memory.use == "reflect" or memory.mix == "balanced") and memory_rows:
        datasets["memory"] = memory_dataset(memory_rows)
    trainer = TorchTrainer(
        worker.train_stage,
        train_loop_config={
            "run": run.model_dump(mode="json"),  # plain dicts survive Ray's copies; re-validated there
            "stage": stage.to_dict(),
            "task_names": [t.name for t in tasks],
            "init_state": init_state,
            "needs_memory": needs_memory,
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
            failure_config=ray.train.FailureConfig(max_failures=run.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        predictions = json.loads((Path(directory) / worker.PREDICTIONS_FILE).read_text())
        history = json.loads((Path(directory) / worker.HISTORY_FILE).read_text())
        attention_file = Path(directory) / worker.ATTENTION_FILE
        attention = json.loads(attention_file.read_text()) if attention_file.exists() else None
    generator = Path(result.checkpoint.path) / worker.GENERATOR_DIR
    return StageResult(checkpoint_path=result.checkpoint.path, predictions=predictions, history=history,
                       attention=attention, generator_path=str(generator) if generator.is_dir() else None)


@contextlib.contextmanager
def local_state(checkpoint_path: str) -> Iterator[Path]:
    """The method state inside a stage's final checkpoint, as a local folder (downloaded when the
    storage is remote, for as long as the block runs)."""
    with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
        yield Path(directory) / worker.STATE_DIR


def place_state(local_state_dir: Path, storage_path: str, name: str) -> str:
    """Puts a method state from the driver where every worker reads stage inputs (the storage path);
    returns the path to pass as a stage's ``init_state``."""
    if "://" not in storage_path:
        target = Path(storage_path).resolve() / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(local_state_dir, target / worker.STATE_DIR)
        return str(target)
    import pyarrow.fs

    target = f"{storage_path.rstrip('/')}/{name}"
    pyarrow.fs.copy_files(str(local_state_dir), f"{target}/{worker.STATE_DIR}")
    return target
