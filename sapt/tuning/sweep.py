"""A sweep: one Ray Tune Tuner per task order (Optuna search, ASHA stopping between tasks; the Tune calls
are in sapt.cluster.tune), each trial a whole sequence scored on validation; then the best config per
order and summary.json.

Folder layout (``runs/sweeps/NAME`` by default)::

    sweep.json               what was asked: base config, space, orders, samples (a resume must match)
    mlflow.db, mlartifacts/  the sweep's MLflow store (unless the base config names a server)
    tune/<order>/            Tune's experiment state: what ``Tuner.restore`` resumes
    trials/<order>/<trial>/  each trial's output_dir (results.json, Train checkpoints, memory)
    best-<order>.yaml        the best trial's config for ``sapt run``, scored on test
    summary.json             every trial: values, validation AP per task, status, MLflow run
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sapt.cluster.tune import CONSOLE, start_ray, tune_order
from sapt.config import preset_names
from sapt.data.loading import load_tasks
from sapt.errors import SaptError
from sapt.tuning import summary, tracking
from sapt.tuning.configs import base_config, check_space
from sapt.tuning.space import load_space
from sapt.tuning.trial import METRIC, TIME_ATTR, TrialSetup, run_trial

log = logging.getLogger("sapt.sweep")

RECORD_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"
SPACES_DIR = "tuning"


@dataclass
class SweepRequest:
    """What ``sapt sweep`` was asked (the CLI's arguments).

    Args:
        config, overrides: the base config (preset or YAML) and its ``--set`` overrides.
        space: a space file; empty: ``tuning/<method>.yaml``.
        orders: ``--order`` values (a name, ``[a,b]`` or ``a,b``); empty: the config's order.
        samples: trials per order. concurrent: trials at a time.
        name: the sweep's name (folder, MLflow experiment); empty: the config's name.
        output: the sweep folder; empty: ``runs/sweeps/<name>``.
        resume: insist on continuing an existing sweep (an existing folder is resumed anyway).
    """

    config: str
    overrides: list[str] = field(default_factory=list)
    space: str = ""
    orders: list[str] = field(default_factory=list)
    samples: int = 8
    concurrent: int = 1
    name: str = ""
    output: str = ""
    resume: bool = False


@dataclass(frozen=True)
class SweepPlan:
    """A checked request: what ``execute_sweep`` runs. Making one writes nothing."""

    request: SweepRequest
    name: str
    folder: Path
    base: dict
    space: Any
    orders: dict[str, tuple[str | list[str], list[str]]]


def plan_sweep(request: SweepRequest) -> SweepPlan:
    """Checks the request (config, space file, orders and their data, a resume's folder) before
    anything is written or started.

    Raises:
        SaptError: naming the file or option and the key at fault.
    """
    if request.samples < 1 or request.concurrent < 1:
        raise SaptError("must be at least 1", source="--samples" if request.samples < 1 else "--concurrent")
    base = base_config(request.config, request.overrides)
    if base["val_size"] < 1:
        raise SaptError("a sweep scores trials on validation items carved from train: set val_size >= 1",
                        source=request.config, field="val_size")
    space = load_space(request.space or _default_space(base["method"]))
    check_space(space, base)
    orders = _plan_orders(base, request.orders)
    name = request.name or _default_name(request.config)
    folder = Path(request.output or Path("runs") / "sweeps" / name).resolve()
    if request.resume and not (folder / RECORD_FILE).is_file():
        raise SaptError("--resume: no sweep to resume here", source=str(folder))
    return SweepPlan(request, name, folder, base, space, orders)


def run_sweep(request: SweepRequest) -> dict[str, Path]:
    """Runs (or resumes) the sweep; returns order label -> the best config's YAML path.

    Raises:
        SaptError: a bad config, space file or order (before any trial starts), a resume that does
            not match the sweep in the folder, or an order none of whose trials completed.
    """
    return execute_sweep(plan_sweep(request))


def execute_sweep(plan: SweepPlan) -> dict[str, Path]:
    """``run_sweep`` of a checked request."""
    request, name, folder, base, space, orders = (plan.request, plan.name, plan.folder, plan.base, plan.space,
                                                   plan.orders)
    record = {"name": name, "base": base, "space": space.to_json(), "orders": {k: v[0] for k, v in orders.items()},
              "samples": request.samples, "concurrent": request.concurrent, "seed": base["seed"]}
    record = _start_or_resume(folder, record, request.resume)
    uri = tracking.sweep_tracking_uri(base["mlflow"]["tracking_uri"], folder)
    experiment_id = tracking.prepare_experiment(uri, name, folder)
    log.info("sweep %s in %s: %d order(s) x %d samples, MLflow experiment %r at %s", name, folder, len(orders),
             record["samples"], name, uri, extra=CONSOLE)
    started = time.perf_counter()
    outcome: dict[str, dict] = {}
    stopper = start_ray(base, record["concurrent"])
    try:
        for label, (order, names) in orders.items():
            setup = TrialSetup(sweep=name, label=label, order=order, num_tasks=len(names), base=base,
                               trials_dir=str(folder / "trials" / label), tracking_uri=uri)
            tracking.close_unfinished(uri, experiment_id, name, label)  # left by an interrupted sweep
            results = tune_order(run_trial, setup, dimensions=space.dimensions, storage=folder / "tune",
                                 label=label, tasks=names, samples=record["samples"],
                                 concurrent=record["concurrent"], seed=record["seed"], metric=METRIC,
                                 time_attr=TIME_ATTR)
            records = summary.trial_records(results, len(names), tracking.trial_runs(uri, experiment_id, name, label))
            tracking.mark_stopped(uri, [r["mlflow_run_id"] for r in records
                                        if r["status"] == "stopped" and r["mlflow_run_id"]])
            tracking.close_unfinished(uri, experiment_id, name, label)
            outcome[label] = {"order": order, "tasks": names, "trials": records}
    finally:
        stopper()
    return _write_outputs(folder, record, base, outcome, uri, time.perf_counter() - started)


def _write_outputs(folder: Path, record: dict, base: dict, outcome: dict[str, dict], uri: str,
                   seconds: float) -> dict[str, Path]:
    several = len(outcome) > 1
    best_paths: dict[str, Path] = {}
    for label, entry in outcome.items():
        best = summary.best_trial(entry["trials"])
        entry["best"] = None
        if best is None:
            continue
        output_dir = f"{base['output_dir']}/{label}" if several else base["output_dir"]
        path = summary.write_best(folder / f"best-{label}.yaml", base, best, order=entry["order"],
                                  output_dir=output_dir, sweep=record["name"], label=label)
        entry["best"] = {"trial": best["trial"], METRIC: best[METRIC], "values": best["values"],
                         "mlflow_run_id": best["mlflow_run_id"], "config": str(path)}
        best_paths[label] = path
        log.info("%s: best trial %s, validation AP %.2f: %s -> %s", label, best["trial"], best[METRIC],
                 best["values"], path, extra=CONSOLE)
    data = {"sweep": record["name"], "folder": str(folder), "metric": f"{METRIC}: validation AP after the last task",
            "space": record["space"], "samples": record["samples"],
            "mlflow": {"tracking_uri": uri, "experiment": record["name"]},
            "seconds_this_invocation": round(seconds, 1), "orders": outcome}
    (folder / SUMMARY_FILE).write_text(json.dumps(data, indent=2))
    missing = [label for label in outcome if label not in best_paths]
    if missing:
        raise SaptError(f"no trial completed every task of order(s) {', '.join(missing)}; see the trials' "
                        "errors there", source=str(folder / SUMMARY_FILE))
    return best_paths


def _start_or_resume(folder: Path, record: dict, insist: bool) -> dict:
    """A new sweep writes sweep.json; an existing one must have been asked the same (its record wins)."""
    file = folder / RECORD_FILE
    if not file.is_file():
        if insist:
            raise SaptError("--resume: no sweep to resume here", source=str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(record, indent=2))
        return record
    saved = json.loads(file.read_text())
    differing = _differences(saved, record, ignore=("concurrent",))
    if differing:
        key = differing[0]
        raise SaptError(f"the sweep in {folder} was started with a different {key} ({len(differing)} key(s) "
                        "differ); resume it with its own command, or pass another --name or --output",
                        source=str(file), field=key)
    log.info("resuming the sweep in %s", folder, extra=CONSOLE)
    return saved


def _differences(saved: Any, given: Any, prefix: str = "", ignore: tuple[str, ...] = ()) -> list[str]:
    if isinstance(saved, dict) and isinstance(given, dict):
        keys = [k for k in {**saved, **given} if k not in ignore]
        return [d for k in keys for d in _differences(saved.get(k), given.get(k), f"{prefix}{k}.")]
    return [] if saved == given else [prefix.rstrip(".")]


def _plan_orders(base: dict, given: list[str]) -> dict[str, tuple[str | list[str], list[str]]]:
    """label -> (order as the config takes it, its task names); every order's data checked now."""
    plan: dict[str, tuple[str | list[str], list[str]]] = {}
    for text in given or [base["order"]]:
        order = _parse_order(text)
        tasks = load_tasks(base["data_dir"] or None, order, max_train_per_task=base["max_train_per_task"],
                           max_eval_per_task=base["max_eval_per_task"], val_size=base["val_size"], seed=base["seed"])
        names = [t.name for t in tasks]
        empty = [t.name for t in tasks if not t.val]
        if empty:
            raise SaptError(f"task {empty[0]!r} has no validation items to score trials on", source="val_size")
        label = _order_label(order, names)
        if label in plan:
            raise SaptError(f"order {label} is given twice", source="--order")
        plan[label] = (order, names)
    return plan


def _parse_order(value: str | list[str]) -> str | list[str]:
    """``long-3`` (a named order), ``[sst2,rte]`` (YAML list) or ``sst2,rte``."""
    if isinstance(value, list):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, list):
        return [str(t) for t in parsed]
    if "," in value:
        return [t.strip() for t in value.split(",") if t.strip()]
    return value.strip()


def _order_label(order: str | list[str], names: list[str]) -> str:
    if isinstance(order, str):
        return order
    label = "+".join(names)
    if len(label) <= 80:
        return label
    return f"{names[0]}+{len(names) - 1}-more-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def _default_name(config: str) -> str:
    return config if config in preset_names() else Path(config).stem


def _default_space(method: str) -> Path:
    """``tuning/<method>.yaml`` in the working directory, else in the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / SPACES_DIR / f"{method}.yaml"
        if path.is_file():
            return path
    raise SaptError(f"no search space for method {method} (looked for {SPACES_DIR}/{method}.yaml): give --space FILE",
                    source="--space")
