"""The zero-shot reference (the SAPT paper's T5-ZS analogue): the frozen backbone, no PET block and no
training, scored on every task of an order with Ray Data batch inference (greedy decoding, the run's
prompts, caps and seed, so the items are the ones the methods are scored on)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import ray
import torch

from sapt.backbones import load_backbone
from sapt.cluster.batch_predict import in_input_order
from sapt.config import RunConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.evaluation.generate import generate_answers
from sapt.evaluation.metrics import score_task

log = logging.getLogger(__name__)


class BackboneAnswerer:
    """A Ray Data actor holding the frozen backbone."""

    def __init__(self, run: dict, exclude_tasks: list[str]):
        torch.set_num_threads(1)  # one core per actor; Ray gives each actor one CPU
        config = RunConfig.model_validate(run)
        backbone = load_backbone(config.backbone, data_dir=config.data_dir or None, exclude_tasks=exclude_tasks)
        self.model = backbone.model
        self.collator = Collator.for_backbone(backbone, config.train.max_source_len, config.train.max_target_len,
                                              config.train.prompt_format)
        self.max_new_tokens = config.eval.max_new_tokens

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        answers = generate_answers(self.model, self.collator, batch["input"].tolist(),
                                   max_new_tokens=self.max_new_tokens, device=torch.device("cpu"))
        return batch.assign(answer=answers)


def score_zero_shot(run: RunConfig, *, actors: int = 1) -> dict:
    """Scores the bare backbone of ``run`` on every task of its order, on ``eval.split`` (Ray must be up).

    Returns:
        ``{"backbone", "order", "split", "scores": {task: 0-100}, "mean", "seconds"}``.

    Raises:
        SaptError: bad task data or backbone, as ``sapt run`` would report them.
    """
    from sapt.backbones import check_backbone
    from sapt.cluster.worker import quiet_ray_data

    quiet_ray_data()
    split = run.eval.split
    started = time.perf_counter()
    tasks = load_tasks(run.data_dir or None, run.order, max_train_per_task=run.max_train_per_task,
                       max_eval_per_task=run.max_eval_per_task, val_size=run.val_size, seed=run.seed)
    names = [t.name for t in tasks]
    # Warm-up here, once; a prompt format the backbone cannot take fails here, not in the actors.
    check_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=names,
                   prompt_format=run.train.prompt_format)
    items = {i: task.val if split == "val" else task.test for i, task in enumerate(tasks)}
    rows = [{"input": ex.source, "task": i, "item": n} for i, examples in items.items() for n, ex in enumerate(examples)]
    log.info("zero-shot: %s on %d items of %d tasks", run.backbone, len(rows), len(tasks))
    answered = in_input_order(ray.data.from_items(rows)).map_batches(
        BackboneAnswerer,
        fn_constructor_kwargs={"run": run.model_dump(mode="json"), "exclude_tasks": names},
        batch_size=run.eval.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    ).take_all()
    answers = {(int(r["task"]), int(r["item"])): str(r["answer"]) for r in answered}
    scores = {task.name: score_task(task.kind, [answers[(i, n)] for n in range(len(items[i]))],
                                    [ex.references for ex in items[i]])
              for i, task in enumerate(tasks)}
    return {"backbone": run.backbone, "order": names, "split": split, "scores": scores,
            "mean": sum(scores.values()) / len(scores), "seconds": round(time.perf_counter() - started, 1)}


def run_zero_shot(run: RunConfig, *, actors: int = 1) -> Path:
    """``score_zero_shot`` on a local Ray or ``ray.address``, logged as an MLflow run (``score.TASK``,
    ``mean_score``) in the run's experiment; writes and returns OUTPUT_DIR/zero_shot.json."""
    from sapt.cluster.session import ensure_ray
    from sapt.registry.pool_scores import log_scores
    from sapt.registry.tracking import resolve_tracking_uri

    output_dir = Path(run.output_dir)
    uri = resolve_tracking_uri(run.mlflow.tracking_uri, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray(run.ray.address, num_workers=actors, cpus_per_worker=1.0, use_gpu=False)
    result = score_zero_shot(run, actors=actors)
    result["mlflow"] = {"tracking_uri": uri, "run_id": log_scores(
        uri, run.mlflow.experiment, run_name="zero-shot",
        tags={"sapt.method": "zero-shot", "sapt.backbone": run.backbone, "sapt.split": result["split"]},
        scores=result["scores"], mean=result["mean"])}
    path = output_dir / "zero_shot.json"
    path.write_text(json.dumps(result, indent=1))
    return path
