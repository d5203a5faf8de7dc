"""The sweep's side of MLflow: its experiment, made before any trial starts (concurrent trials would race
to create it), and its trials' parent runs, found again by their tags."""

from __future__ import annotations

import logging
from pathlib import Path

from sapt.registry.mlflow_connection import connect

log = logging.getLogger(__name__)


def sweep_tracking_uri(base_uri: str, folder: Path) -> str:
    """The base config's store (e.g. a server), or a sqlite store inside the sweep folder."""
    return base_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def prepare_experiment(tracking_uri: str, name: str, folder: Path) -> str:
    """The id of the experiment named ``name``, created if new (artifacts in the sweep folder when the
    store is the sweep's own sqlite file).

    Raises:
        SaptError: the store cannot be reached.
    """
    client = connect(tracking_uri, create=True)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    own = tracking_uri.startswith("sqlite:///") and Path(tracking_uri[len("sqlite:///"):]).parent == folder
    location = (folder / "mlartifacts").resolve().as_uri() if own else None
    return client.create_experiment(name, artifact_location=location)


def _sweep_runs(tracking_uri: str, experiment_id: str, sweep: str, label: str) -> list:
    client = connect(tracking_uri)
    query = f"tags.`sapt.sweep` = '{sweep}' and tags.`sapt.order` = '{label}'"
    return client.search_runs([experiment_id], query, max_results=5000)


def trial_runs(tracking_uri: str, experiment_id: str, sweep: str, label: str) -> dict[str, dict]:
    """trial id -> {"run_id", "status"} of its parent run; a finished run wins over an earlier attempt."""
    found: dict[str, dict] = {}
    runs = sorted(_sweep_runs(tracking_uri, experiment_id, sweep, label), key=lambda r: r.info.start_time)
    for run in runs:
        trial = run.data.tags.get("sapt.trial")
        if trial and (trial not in found or found[trial]["status"] != "FINISHED"):
            found[trial] = {"run_id": run.info.run_id, "status": run.info.status}
    return found


def mark_stopped(tracking_uri: str, run_ids: list[str]) -> None:
    """Trials that ASHA stopped between tasks: KILLED, not FAILED (Tune ends them with SystemExit)."""
    client = connect(tracking_uri)
    for run_id in run_ids:
        client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, "sapt.sweep_status", "stopped")


def close_unfinished(tracking_uri: str, experiment_id: str, sweep: str, label: str) -> int:
    """Marks the order's parent runs still RUNNING as KILLED: trials an interrupted sweep left behind.
    Call it only while none of the order's trials runs."""
    client = connect(tracking_uri)
    left = [r for r in _sweep_runs(tracking_uri, experiment_id, sweep, label) if r.info.status == "RUNNING"]
    for run in left:
        client.set_terminated(run.info.run_id, status="KILLED")
    if left:
        log.info("marked %d unfinished trial run(s) of %s as KILLED", len(left), label)
    return len(left)
