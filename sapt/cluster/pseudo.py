"""ARM's pseudo samples as Ray Data batch inference: an actor pool of generators writes task prompts.

Each actor loads the backbone once and the task's generator adapter, then samples one batch of
prompts per input row batch. Seeds come from the rows, so the output does not depend on how
many actors ran.
"""

from __future__ import annotations

import numpy as np
import ray.data
import torch
from peft import PeftModel

from sapt.backbones import load_backbone
from sapt.methods.base import GeneratorSettings
from sapt.methods.pseudo_generator import generator_collator, sample_prompts


class PromptSampler:
    """A Ray Data actor: backbone + one generator adapter, sampling prompts for batches of seeds."""

    def __init__(self, backbone: str, data_dir: str | None, exclude_tasks: list[str], generator_path: str,
                 settings: GeneratorSettings):
        torch.set_num_threads(1)  # one core per actor; Ray gives each actor one CPU
        loaded = load_backbone(backbone, data_dir=data_dir, exclude_tasks=exclude_tasks)
        self.model = PeftModel.from_pretrained(loaded.model, generator_path).eval()
        self.collator = generator_collator(loaded, settings)
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = batch["seed"]
        texts = sample_prompts(self.model, self.collator, len(seeds), self.settings, seed=int(seeds[0]))
        return {"task": batch["task"], "source": np.array(texts, dtype=object)}


def generate_pseudo_prompts(*, backbone: str, data_dir: str | None, exclude_tasks: list[str], generator_path: str,
                            settings: GeneratorSettings, task: int, count: int, seed: int,
                            actors: int = 1, batch_size: int = 16) -> list[dict]:
    """``count`` pseudo prompts of task ``task``: rows {"task", "source"}, empty generations dropped."""
    seeds = ray.data.from_items([{"task": task, "seed": seed * 100003 + i} for i in range(count)])
    generated = seeds.map_batches(
        PromptSampler,
        fn_constructor_kwargs={"backbone": backbone, "data_dir": data_dir, "exclude_tasks": exclude_tasks,
                               "generator_path": generator_path, "settings": settings},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    rows = generated.take_all()
    return [{"task": int(r["task"]), "source": str(r["source"])} for r in rows if str(r["source"]).strip()]
