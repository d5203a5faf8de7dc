"""Pseudo samples of one learned task, apart from its run: the task's generator (a local folder, or an
MLflow artifact URI such as ``runs:/RUN_ID/generators/01-first-word``) samples prompts with Ray Data.

With the run's config and seed the prompts equal what the run remembered of that task, so a user can
inspect, enlarge or re-create ARM's memory without training again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from sapt.config import RunConfig
from sapt.data.loading import load_tasks
from sapt.errors import SaptError
from sapt.methods import build_method

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's own names; no pickles


def local_generator(location: str, tracking_uri: str, dest: Path) -> Path:
    """The generator folder at ``location``, downloaded into ``dest`` when it is an artifact URI.

    Raises:
        SaptError: nothing there, or not a PEFT adapter saved as safetensors.
    """
    folder = Path(location).expanduser()
    if urlparse(location).scheme and not folder.is_dir():  # runs:/, models:/, s3://, ...
        from sapt.registry.run_artifacts import download

        folder = download(location, dest, tracking_uri, what="generator")
        if not folder.is_dir():
            raise SaptError("cannot download the generator: no folder at this URI (run id and path?)", source=location)
    if not folder.is_dir():
        raise SaptError("no generator folder here", source=location)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise SaptError(f"not a generator adapter folder: {', '.join(missing)} missing", source=location,
                        field=missing[0])
    return folder


@dataclass(frozen=True)
class SamplePlan:
    task_index: int  # in the order
    count: int
    order: list[str]  # the order's task names (embedded backbones leave them out of their warm-up)
    real_sources: list[str] = field(default_factory=list)  # the task's training prompts (generator_lengths real)


def plan_samples(run: RunConfig, task_name: str, count: int | None) -> SamplePlan:
    """Which task and how many prompts: by default as many as the run keeps of the task.

    Raises:
        SaptError: a method without pseudo samples, a task outside the order, a count below 1.
    """
    spec = build_method(run.method, run.method_args, run.pet).memory()
    if spec is None or spec.generator is None:
        raise SaptError(f"method {run.method!r} keeps no pseudo samples from a generator", source="config",
                        field="method")
    tasks = load_tasks(run.data_dir or None, run.order, max_train_per_task=run.max_train_per_task,
                       max_eval_per_task=run.max_eval_per_task, val_size=run.val_size, seed=run.seed)
    names = [t.name for t in tasks]
    if task_name not in names:
        raise SaptError(f"task {task_name!r} is not in the order ({', '.join(names)})", source="--task")
    index = names.index(task_name)
    if count is None:
        count = spec.count(len(tasks[index].train))  # as many as the run keeps
    if count < 1:
        raise SaptError(f"expected at least 1, got {count}", source="--count")
    return SamplePlan(index, count, names, [ex.source for ex in tasks[index].train])


def sample_task(run: RunConfig, plan: SamplePlan, generator: Path, *, actors: int = 1) -> list[dict]:
    """The planned pseudo prompts as memory rows {"task", "source", "target": ""}, seeded as the run."""
    from sapt.cluster.pseudo import generate_pseudo_prompts, pseudo_seed

    settings = build_method(run.method, run.method_args, run.pet).memory().generator
    rows = generate_pseudo_prompts(
        backbone=run.backbone, data_dir=run.data_dir or None, exclude_tasks=plan.order,
        generator_path=str(generator), settings=settings, task=plan.task_index, count=plan.count,
        seed=pseudo_seed(run.seed, plan.task_index), real_sources=plan.real_sources, actors=actors,
    )
    return [{**row, "target": ""} for row in rows]


def write_rows(rows: list[dict], path: Path) -> None:
    """JSONL, written beside and then renamed: never a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    partial.replace(path)
