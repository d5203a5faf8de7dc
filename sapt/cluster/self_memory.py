"""Self-written memory as Ray Data batch inference: the method's finished model writes pseudo items of
every finished task (``MemorySpec.source == "self"``, LFPT5's pseudo samples).

Each actor loads the backbone and the finished state of the newest stage once (from the stage's
checkpoint, wherever the storage is). One input row stands for one sampling batch (task, seed,
size), so the items depend on the seeds and the batch size alone, not on how many actors ran; they
come back in batch order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray.data
import ray.train
import torch

from sapt.backbones import load_backbone
from sapt.cluster import worker
from sapt.cluster.pseudo import sampling_batches
from sapt.config import RunConfig
from sapt.data.collate import Collator
from sapt.methods import build_method

BATCH = 16  # items per sampling call


class SelfSampler:
    """A Ray Data actor: the finished model of one stage, writing items of the tasks asked for."""

    def __init__(self, run: dict, checkpoint_path: str, exclude_tasks: list[str]):
        torch.set_num_threads(1)  # one core per actor; Ray gives each actor one CPU
        config = RunConfig.model_validate(run)
        self.method = build_method(config.method, config.method_args, config.pet)
        backbone = load_backbone(config.backbone, data_dir=config.data_dir or None, exclude_tasks=exclude_tasks)
        with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
            self.model = self.method.load_finished(backbone, Path(directory) / worker.STATE_DIR)
        self.collator = Collator.for_backbone(backbone, config.train.max_source_len, config.train.max_target_len,
                                              config.train.prompt_format)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"task": [], "position": [], "source": [], "target": []}
        for task, seed, start, count in zip(batch["task"], batch["seed"], batch["start"], batch["count"]):
            items = self.method.sample_memory(self.model, self.collator, int(task), int(count), seed=int(seed))
            out["task"] += [int(task)] * len(items)
            out["position"] += [int(start) + i for i in range(len(items))]
            out["source"] += [item["source"] for item in items]
            out["target"] += [item["target"] for item in items]
        return {"task": np.array(out["task"], dtype=np.int64), "position": np.array(out["position"], dtype=np.int64),
                "source": np.array(out["source"], dtype=object), "target": np.array(out["target"], dtype=object)}


def sample_self_memory(run: RunConfig, checkpoint_path: str, counts: dict[int, int], seeds: dict[int, int],
                       exclude_tasks: list[str], actors: int = 1) -> dict[int, list[dict]]:
    """``counts[task]`` samples of every task in ``counts``, parsed into items: rows {"task", "source",
    "target"} by task (a task's list may be shorter: unparsed samples are left out)."""
    plan = [{"task": task, **batch} for task, count in sorted(counts.items())
            for batch in sampling_batches(seeds[task], count, BATCH)]
    written = ray.data.from_items(plan).map_batches(
        SelfSampler,
        fn_constructor_kwargs={"run": run.model_dump(mode="json"), "checkpoint_path": checkpoint_path,
                               "exclude_tasks": exclude_tasks},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    rows = sorted(written.take_all(), key=lambda r: (int(r["task"]), int(r["position"])))
    by_task: dict[int, list[dict]] = {task: [] for task in counts}
    for row in rows:
        by_task[int(row["task"])].append({"task": int(row["task"]), "source": str(row["source"]),
                                          "target": str(row["target"])})
    return by_task
