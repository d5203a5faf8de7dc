"""Scoring a registered pool on a benchmark with Ray Data batch inference: every task of its order,
no task ids (the method picks or mixes its blocks), one MLflow run with a score per task and their mean."""

from __future__ import annotations

import json
import logging

import ray

from sapt.cluster.batch_predict import answered
from sapt.data.loading import load_tasks
from sapt.errors import SaptError
from sapt.evaluation.metrics import score_task

log = logging.getLogger(__name__)


def evaluate_pool(tracking_uri: str, name: str, version_or_alias: str, *, data_dir: str | None,
                  max_train_per_task: int | None, max_eval_per_task: int | None, seed: int = 42, val_size: int = 50, split: str = "test",
                  actors: int = 1, batch_size: int = 32, experiment: str = "sapt-eval") -> dict:
    """Scores pool ``name`` at ``version_or_alias`` on every task of the order it was trained on.

    The task items are loaded as ``sapt run`` loads them (the run's ``seed``, ``val_size`` and caps
    give the same items). Returns ``{"pool", "version", "order", "scores": {task: 0-100}, "mean", "run_id"}``.

    Raises:
        SaptError: unknown pool/version/alias, not a pool version, or missing task data.
    """
    from sapt.registry import pool_store
    from sapt.registry.pool_scores import log_scores

    found = pool_store.show(tracking_uri, name, version_or_alias)
    tags = found["tags"]
    if tags.get("kind") != "pool":
        raise SaptError(f"a {tags.get('kind')} version, not a pool", source=found["uri"], field="kind")
    order = json.loads(tags["order"])[: int(tags["task_index"]) + 1]  # the tasks this version has learned
    tasks = load_tasks(data_dir, order, max_train_per_task=max_train_per_task, max_eval_per_task=max_eval_per_task,
                       val_size=val_size, seed=seed)
    rows = [{"input": ex.source, "task": i, "item": n} for i, task in enumerate(tasks)
            for n, ex in enumerate(task.val if split == "val" else task.test)]
    log.info("scoring %s version %d on %d items of %d tasks", name, found["version"], len(rows), len(tasks))
    rows_out = answered(ray.data.from_items(rows), tracking_uri, name, str(found["version"]), actors=actors,
                        batch_size=batch_size).take_all()
    answers: dict[int, dict[int, str]] = {i: {} for i in range(len(tasks))}
    for row in rows_out:
        answers[int(row["task"])][int(row["item"])] = str(row["answer"])
    scores = {}
    for i, task in enumerate(tasks):
        items = task.val if split == "val" else task.test
        scores[task.name] = score_task(task.kind, [answers[i][n] for n in range(len(items))],
                                       [ex.references for ex in items])
    mean = sum(scores.values()) / len(scores)
    run_id = log_scores(tracking_uri, experiment, run_name=f"{name}-v{found['version']}-{split}",
                        tags={"sapt.pool": name, "sapt.pool_version": str(found["version"]), "sapt.split": split},
                        scores=scores, mean=mean)
    return {"pool": name, "version": found["version"], "order": order, "split": split, "scores": scores,
            "mean": mean, "run_id": run_id}
