"""MLflow tracking of a sequence: a parent run per sequence, a nested run per stage.

Only the driver logs; workers hand their numbers back through Ray Train checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sapt.errors import SaptError
from sapt.evaluation.plots import attention_heatmap, matrix_heatmap
from sapt.evaluation.routing import RoutingRecord

PROGRESS_FILE = "progress.json"
MEMORY_DIR = "memory"
GENERATORS_DIR = "generators"  # ARM: each task's pseudo-sample generator, for jobs/generate_pseudo.py
# Config keys a resumed run may change: where things run and are stored, not what is learned.
RESUMABLE_CHANGES = ("ray.", "mlflow.", "output_dir", "data_dir", "eval.batch_size")


def _memory_folder(after: int | None) -> str:
    return MEMORY_DIR if after is None else f"{MEMORY_DIR}/after-t{after:02d}"


def resolve_tracking_uri(tracking_uri: str, output_dir: Path) -> str:
    """Empty means ``$MLFLOW_TRACKING_URI`` (as a cluster's nodes set it), else the embedded default:
    a sqlite store inside the run's output folder."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


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
        resume_run_id: continue this parent run (``--resume``) instead of opening a new one.
        tags: extra tags on a new parent run.
    """

    def __init__(self, tracking_uri: str, experiment: str, output_dir: Path, config: dict, task_names: list[str],
                 resume_run_id: str | None = None, tags: dict[str, str] | None = None):
        self.uri = resolve_tracking_uri(tracking_uri, output_dir)
        self.task_names = task_names
        self.params: dict[str, str] = {}
        _flatten("", config, self.params)
        self._check_reachable()
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # Artifacts beside the sqlite store, so one folder holds the whole embedded run.
            location = (output_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        if resume_run_id:
            self._reopen(resume_run_id, task_names)
            return
        parent = self.client.create_run(self.experiment_id, run_name=f"{config['method']}:{len(task_names)}-tasks",
                                        tags={"sapt.method": config["method"], "sapt.backbone": config["backbone"],
                                              **(tags or {})})
        self.run_id = parent.info.run_id
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in self.params.items()])
        self.client.log_param(self.run_id, "order_names", json.dumps(task_names)[:6000])

    def _reopen(self, run_id: str, task_names: list[str]) -> None:
        """Continues an interrupted sequence's parent run, refusing a config that would change its results."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise SaptError(f"the run {run_id} that registered the pool is not in {self.uri}",
                            source="mlflow.tracking_uri") from None
        logged = dict(run.data.params)
        ours = {k: v[:6000] for k, v in self.params.items()}
        ours["order_names"] = json.dumps(task_names)[:6000]
        differing = sorted(k for k in set(logged) | set(ours)
                           if not k.startswith(RESUMABLE_CHANGES) and logged.get(k) != ours.get(k))
        if differing:
            shown = ", ".join(f"{k} ({logged.get(k)} -> {ours.get(k)})" for k in differing[:6])
            raise SaptError(f"differs from the interrupted run {run_id}: {shown}; resume with its config",
                            source="config", field=differing[0])
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")

    def log_progress(self, progress: dict) -> None:
        """What a resumed run needs of the stages so far (matrix, routing summaries), as progress.json."""
        self.client.log_dict(self.run_id, progress, PROGRESS_FILE)

    def read_progress(self) -> dict:
        """The progress.json of this (reopened) run; empty when it finished no stage."""
        try:
            return mlflow.artifacts.load_dict(f"{self.client.get_run(self.run_id).info.artifact_uri}/{PROGRESS_FILE}")
        except (MlflowException, OSError):
            return {}

    def log_memory(self, path: Path, after: int | None = None) -> None:
        """A finished task's remembered inputs (JSONL), kept with the run so that a resume finds them.
        ``after``: memory that the method writes again after every stage goes to ``memory/after-tNN/``,
        so that a resume reads what its registered state wrote, not a later stage's rewrite."""
        self.client.log_artifact(self.run_id, str(path), _memory_folder(after))

    def log_generator(self, path: str, name: str) -> str:
        """A finished task's pseudo-sample generator (a PEFT adapter folder); returns its ``runs:/`` URI."""
        self.client.log_artifacts(self.run_id, path, f"{GENERATORS_DIR}/{name}")
        return f"runs:/{self.run_id}/{GENERATORS_DIR}/{name}"

    def download_memory(self, dest: Path, after: int | None = None) -> list[Path]:
        """The remembered inputs logged so far (``after``: those written after stage row ``after``), as
        JSONL files in ``dest``."""
        folder = _memory_folder(after)
        if not self.client.list_artifacts(self.run_id, folder):
            return []
        local = mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=folder, dst_path=str(dest),
                                                    tracking_uri=self.uri)
        return sorted(Path(local).glob("*.jsonl"))

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
            if epoch.get("items"):  # all workers' items: the share of remembered (replayed) ones
                entities.append(mlflow.entities.Metric("train_memory_share", epoch["memory_items"] / epoch["items"],
                                                       0, epoch["epoch"]))
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
