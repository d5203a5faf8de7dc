"""One Tune trial, the Ray Train V2 pattern (ecosystem.md 1.4): a plain driver function that runs a whole
order through ``run_sequence`` (one TorchTrainer fit per task, inside the trial) and reports the
validation metrics after each task, so ASHA can stop a trial between tasks. sapt.cluster.tune calls it
with the trial's id and Tune's report; nothing here imports Ray."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapt.tuning.configs import trial_config

# run_sequence's metrics over the tasks so far -> what the trial reports to Tune.
REPORTED = {"AP": "val_ap", "F.Ra": "val_fra", "FWT": "val_fwt", "BWT": "val_bwt",
            "routing_accuracy": "val_routing_accuracy"}
METRIC = "val_ap"
TIME_ATTR = "tasks_done"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one order shares (plain values: Tune keeps it in the object store).

    Args:
        sweep: the sweep's name, also its MLflow experiment.
        label: the order's label (folder and tag).
        order: the order as the config takes it (a name or a list of task names).
        num_tasks: how many tasks the order resolved to.
        base: the base config dict, paths absolute.
        trials_dir: each trial runs in ``trials_dir/<trial id>``.
        tracking_uri: the sweep's MLflow store.
    """

    sweep: str
    label: str
    order: str | list[str]
    num_tasks: int
    base: dict[str, Any]
    trials_dir: str
    tracking_uri: str


def trial_tags(setup: TrialSetup, trial_id: str) -> dict[str, str]:
    """The tags on a trial's MLflow parent run: how the sweep finds its runs again."""
    return {"sapt.sweep": setup.sweep, "sapt.order": setup.label, "sapt.trial": trial_id}


def run_trial(values: dict[str, Any], setup: TrialSetup, *, trial_id: str,
              report: Callable[[dict[str, float | int]], None]) -> None:
    """The trial's driver: the order's sequence with the sampled values, reported after each task.

    Args:
        values: the sampled config keys (``method_args.kl_weight``: 0.7, ...).
        setup: what every trial of the order shares.
        trial_id: Tune's id of this trial (its folder and MLflow tag).
        report: hands Tune one result (``tune.report``); ASHA may end the trial inside it.
    """
    from sapt.runner import run_sequence  # heavy (torch, transformers): only in the trial's process

    run = trial_config(setup.base, values, order=setup.order, output_dir=Path(setup.trials_dir) / trial_id,
                       tracking_uri=setup.tracking_uri, experiment=setup.sweep)

    last: list[tuple[int, dict]] = []

    def on_stage(row: int, metrics: dict[str, float | None]) -> None:
        if row + 1 == setup.num_tasks:
            last.append((row, metrics))  # reported once run_sequence has finished (below)
            return
        # ASHA may stop the trial here: Tune then ends this thread with SystemExit, run_sequence marks the
        # MLflow run failed, and the sweep re-marks it KILLED (summary status "stopped").
        report(_reported(row, metrics))

    run_sequence(run, on_stage=on_stage, run_tags=trial_tags(setup, trial_id))
    for row, metrics in last:
        # After the last task, Tune stops the trial at its report (ASHA's max_t): report only once the
        # sequence has written results.json and closed its MLflow run.
        report(_reported(row, metrics))


def _reported(row: int, metrics: dict[str, float | None]) -> dict[str, float | int]:
    reported = {name: metrics[key] for key, name in REPORTED.items() if metrics.get(key) is not None}
    return {**reported, TIME_ATTR: row + 1}
