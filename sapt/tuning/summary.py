"""What a sweep leaves behind: one record per trial (values, validation AP after each task, status, MLflow
run), the best trial per order, its config as a YAML file ``sapt run`` takes, and summary.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from sapt.tuning.configs import best_config
from sapt.tuning.trial import METRIC, TIME_ATTR


def trial_records(results, num_tasks: int, runs: dict[str, dict]) -> list[dict[str, Any]]:
    """One record per trial of a Tune ``ResultGrid``, in the order Tune created them.

    ``status``: ``completed`` (reported after every task), ``stopped`` (ASHA stopped it between tasks)
    or ``errored``.
    """
    records = []
    for result in results:
        trial = Path(result.path).name  # trial_dirname: the trial id
        history = _history(result.metrics_dataframe)
        done = len(history)
        status = "errored" if result.error is not None else "completed" if done == num_tasks else "stopped"
        run = runs.get(trial, {})
        records.append({
            "trial": trial,
            "status": status,
            "values": dict(result.config),
            "tasks_done": done,
            METRIC: history[-1] if history else None,
            f"{METRIC}_per_task": history,
            "metrics": {k: v for k, v in result.metrics.items() if k.startswith("val_")} if done else {},
            "mlflow_run_id": run.get("run_id"),
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:2000],
        })
    return records


def _history(frame) -> list[float]:
    """val_ap after task 1, 2, ... of the trial's last attempt (a trial restarted by a resume reports
    from task 1 again, after its earlier attempt's rows)."""
    if frame is None or frame.empty or METRIC not in frame or TIME_ATTR not in frame:
        return []
    attempt: list[tuple[int, float]] = []
    for done, value in zip(frame[TIME_ATTR], frame[METRIC]):
        if isinstance(done, float) and math.isnan(done):
            continue
        if attempt and int(done) <= attempt[-1][0]:
            attempt = []
        attempt.append((int(done), float(value)))
    return [value for _, value in attempt]


def best_trial(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest validation AP after the last task (the earliest trial on a tie).

    Stopped trials are left out: their AP covers fewer tasks and is not comparable."""
    completed = [r for r in records if r["status"] == "completed"]
    return max(completed, key=lambda r: r[METRIC], default=None)


def write_best(path: Path, base: dict[str, Any], best: dict[str, Any], *, order: str | list[str],
               output_dir: str, sweep: str, label: str) -> Path:
    """The best trial's config: base config + its values, scored on test, with a header naming its origin."""
    config = best_config(base, best["values"], order=order, output_dir=output_dir)
    chosen = ", ".join(f"{k}={_short(v)}" for k, v in best["values"].items())
    header = (f"# sapt run {path}\n"
              f"# Best trial of sweep {sweep} on order {label}: trial {best['trial']}, validation AP "
              f"{best[METRIC]:.2f} after {best['tasks_done']} tasks (MLflow run {best['mlflow_run_id']}).\n"
              f"# Chosen: {chosen}. Scored on test (eval.split); the sweep never read test data.\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
