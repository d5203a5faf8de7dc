"""The MLflow run of one pool evaluation (``jobs/evaluate_pool.py``): a score per task and their mean,
in an experiment of their own."""

from __future__ import annotations

from collections.abc import Mapping

import mlflow
from mlflow.tracking import MlflowClient


def log_scores(tracking_uri: str, experiment: str, *, run_name: str, tags: Mapping[str, str],
               scores: Mapping[str, float], mean: float) -> str:
    """Logs a finished run with ``score.<task>`` per task and ``mean_score``.

    Args:
        tracking_uri: the MLflow store.
        experiment: the experiment's name, created if new.
        run_name, tags: the run's name and tags.
        scores: task name -> score (0-100). mean: their mean.

    Returns:
        The run's id.
    """
    client = MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(experiment)
    experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(f"score.{k}", v, 0, 0) for k, v in scores.items()]
                     + [mlflow.entities.Metric("mean_score", mean, 0, 0)])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
