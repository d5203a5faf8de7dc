"""Driver side of one stage: a TorchTrainer over Ray Datasets, and what its final checkpoint holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from sapt.cluster import worker
from sapt.cluster.datasets import eval_dataset, train_dataset
from sapt.config import RunConfig
from sapt.data.types import TaskData
from sapt.methods.base import Stage


@dataclass
class StageResult:
    checkpoint_path: str  # the final checkpoint: method state for the next stage
    predictions: dict[str, list[str]]  # task name -> one answer per test item
    history: list[dict]  # per-epoch training stats


def fit_stage(
    run: RunConfig, stage: Stage, tasks: list[TaskData], *, init_state: str | None, storage_path: str, name: str
) -> StageResult:
    """Trains and evaluates one stage on Ray Train workers running DeepSpeed.

    Args:
        init_state: the previous stage's final checkpoint path (None to start from the backbone).
        storage_path, name: where Ray Train keeps this stage's checkpoints. Each stage gets its own
            name: V2 resumes a run of the same (storage_path, name) from its latest checkpoint.
    """
    worker.quiet_ray_data()
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())  # Ray Train rejects relative local paths
    trainer = TorchTrainer(
        worker.train_stage,
        train_loop_config={
            "run": run.model_dump(mode="json"),  # plain dicts survive Ray's copies; re-validated there
            "stage": stage.to_dict(),
            "task_names": [t.name for t in tasks],
            "init_state": init_state,
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
        datasets={"train": train_dataset(tasks, stage, run.seed), "eval": eval_dataset(tasks, stage)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        predictions = json.loads((Path(directory) / worker.PREDICTIONS_FILE).read_text())
        history = json.loads((Path(directory) / worker.HISTORY_FILE).read_text())
    return StageResult(checkpoint_path=result.checkpoint.path, predictions=predictions, history=history)
