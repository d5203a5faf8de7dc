"""ARM's pseudo samples as Ray Data batch inference: an actor pool of generators writes task prompts.

Each actor loads the backbone once and the task's generator adapter. One input row stands for one
sampling batch (its seed and size), so the prompts depend on the seed and the batch size alone, not
on how many actors ran or how Ray Data cut the blocks; they come back in batch order.
"""

from __future__ import annotations

import numpy as np
import ray.data
import torch
from peft import PeftModel

from sapt.backbones import load_backbone
from sapt.methods.base import GeneratorSettings
from sapt.methods.pseudo_generator import generator_collator, prompt_lengths, sample_prompts


class PromptSampler:
    """A Ray Data actor: backbone + one generator adapter, sampling prompts for batches of seeds."""

    def __init__(self, backbone: str, data_dir: str | None, exclude_tasks: list[str], generator_path: str,
                 settings: GeneratorSettings, real_sources: list[str]):
        torch.set_num_threads(1)  # one core per actor; Ray gives each actor one CPU
        loaded = load_backbone(backbone, data_dir=data_dir, exclude_tasks=exclude_tasks)
        self.model = PeftModel.from_pretrained(loaded.model, generator_path).eval()
        self.collator = generator_collator(loaded, settings)
        self.settings = settings
        self.lengths = prompt_lengths(self.collator, real_sources) if real_sources else []  # generator_lengths real

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks, positions, texts = [], [], []
        for task, seed, start, count in zip(batch["task"], batch["seed"], batch["start"], batch["count"]):
            sampled = sample_prompts(self.model, self.collator, int(count), self.settings, seed=int(seed),
                                     lengths=self.lengths)
            tasks += [int(task)] * len(sampled)
            positions += range(int(start), int(start) + len(sampled))
            texts += sampled
        return {"task": np.array(tasks), "position": np.array(positions), "source": np.array(texts, dtype=object)}


PSEUDO_BATCH = 16  # prompts per sampling batch (each with its own seed)


def sampling_batches(seed: int, count: int, batch_size: int = PSEUDO_BATCH) -> list[dict]:
    """How ``count`` prompts are sampled: batches {"seed", "start", "count"}, each seeded on its own."""
    return [{"seed": seed * 100003 + start, "start": start, "count": min(batch_size, count - start)}
            for start in range(0, count, batch_size)]


def pseudo_seed(run_seed: int, task_index: int) -> int:
    """The sampling seed of task ``task_index``'s pseudo prompts: a run and a later generation job
    given the same run seed write the same prompts."""
    return run_seed * 7919 + task_index


def generate_pseudo_prompts(*, backbone: str, data_dir: str | None, exclude_tasks: list[str], generator_path: str,
                            settings: GeneratorSettings, task: int, count: int, seed: int, real_sources: list[str],
                            actors: int = 1, batch_size: int = PSEUDO_BATCH) -> list[dict]:
    """``count`` pseudo prompts of task ``task``: rows {"task", "source"}, empty generations dropped.
    ``real_sources``: the task's training prompts, whose lengths ``settings.lengths == "real"`` draws."""
    plan = [{"task": task, **batch} for batch in sampling_batches(seed, count, batch_size)]
    generated = ray.data.from_items(plan).map_batches(
        PromptSampler,
        fn_constructor_kwargs={"backbone": backbone, "data_dir": data_dir, "exclude_tasks": exclude_tasks,
                               "generator_path": generator_path, "settings": settings,
                               "real_sources": real_sources if settings.lengths == "real" else []},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    rows = sorted(generated.take_all(), key=lambda r: int(r["position"]))
    return [{"task": int(r["task"]), "source": str(r["source"])} for r in rows if str(r["source"]).strip()]
