"""MLflow tracking of a sequence: a parent run per sequence, a nested run per stage.

Only the driver logs; workers hand their numbers back through Ray Train checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from sapt.errors import SaptError
from sapt.evaluation.plots import attention_heatmap, matrix_heatmap
from sapt.evaluation.routing import RoutingRecord


def resolve_tracking_uri(tracking_uri: str, output_dir: Path) -> str:
    """Empty means the embedded default: a sqlite store inside the run's output folder."""
    return tracking_uri or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)


class SequenceTracker:
    """Opens the parent run; ``stage`` and ``finish`` log into it.

    Args:
        config: the run config as a plain dict (logged as flattened params).
        task_names: the order.
    """

    def __init__(self, tracking_uri: str, experiment: str, output_dir: Path, config: dict, task_names: list[str]):
        self.uri = resolve_tracking_uri(tracking_uri, output_dir)
        self.task_names = task_names
        self.params: dict[str, str] = {}
        _flatten("", config, self.params)
        self._check_reachable()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # Artifacts beside the sqlite store, so one folder holds the whole embedded run.
            location = (output_dir / "mlartifacts").resolve().as_uri() if not tracking_uri else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        parent = self.client.create_run(self.experiment_id, run_name=f"{config['method']}:{len(task_names)}-tasks",
                                        tags={"sapt.method": config["method"], "sapt.backbone": config["backbone"]})
        self.run_id = parent.info.run_id
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in self.params.items()])
        self.client.log_param(self.run_id, "order_names", json.dumps(task_names)[:6000])

    def _check_reachable(self) -> None:
        if not self.uri.startswith("http"):
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            MlflowClient(self.uri).search_experiments(max_results=1)
        except Exception as err:
            raise SaptError(f"MLflow server unreachable: {err.__class__.__name__}", source="mlflow.tracking_uri") from None

    def stage(self, row: int, train_tasks: list[str], scores: dict[int, float], history: list[dict],
              matrix: list[list[float | None]], routing: RoutingRecord | None = None) -> None:
        """One nested run per stage: its scores a[row][i], its loss curve; parent gets the matrix so far."""
        nested = self.client.create_run(
            self.experiment_id,
            run_name=f"{row + 1:02d}-{'+'.join(train_tasks)}"[:200],
            tags={"mlflow.parentRunId": self.run_id, "sapt.task_index": str(row + 1),
                  "sapt.task": "+".join(train_tasks)},
        )
        run_id = nested.info.run_id
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in self.params.items()])
        metrics = {f"a_{row + 1}_{i + 1}": s for i, s in scores.items()}
        metrics.update({f"score.{self.task_names[i]}": s for i, s in scores.items()})
        if routing is not None and routing.accuracy[row] is not None:
            metrics["routing_accuracy"] = routing.accuracy[row]
        self._log_losses(run_id, history)
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
            self.client.log_metric(self.run_id, key, value, step=row + 1)
        self.client.set_terminated(run_id)
        self._log_matrix(matrix, title=f"accuracy after task {row + 1}")

    def _log_losses(self, run_id: str, history: list[dict]) -> None:
        entities = []
        step = 0
        for epoch in history:
            for loss in epoch["losses"]:
                entities.append(mlflow.entities.Metric("train_loss", loss, 0, step))
                step += 1
            entities.append(mlflow.entities.Metric("tokens_per_second", epoch["tokens_per_second"], 0, epoch["epoch"]))
            for term, value in epoch.get("terms", {}).items():  # e.g. ARM's KL, per epoch
                entities.append(mlflow.entities.Metric(f"train_{term}", value, 0, epoch["epoch"]))
        for start in range(0, len(entities), 900):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run_id, metrics=entities[start : start + 900])

    def _log_matrix(self, matrix: list[list[float | None]], title: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "accuracy_matrix.json").write_text(json.dumps({"order": self.task_names, "matrix": matrix}))
            matrix_heatmap(matrix, self.task_names, Path(tmp) / "accuracy_matrix.png", title)
            self.client.log_artifacts(self.run_id, tmp)

    def finish(self, metrics: dict[str, float | None], results_path: Path, routing: RoutingRecord | None = None) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.client.log_metric(self.run_id, key, value)
        if routing is not None and routing.seen:
            with tempfile.TemporaryDirectory() as tmp:
                attention_heatmap(routing.test, self.task_names, Path(tmp) / "attention_test.png",
                                  "shared attention at test time (after the last task)")
                attention_heatmap(routing.train, self.task_names, Path(tmp) / "attention_train.png",
                                  "shared attention right after training each task")
                self.client.log_artifacts(self.run_id, tmp)
        self.client.log_artifact(self.run_id, str(results_path))
        self.client.set_terminated(self.run_id)

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")
