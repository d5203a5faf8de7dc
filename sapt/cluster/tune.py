"""Ray Tune for `sapt sweep`: the Ray the trials run on, one Tuner per order (Optuna search, ASHA stopping
between tasks) and the trainable that hands a plain driver function its trial id and Tune's report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sapt.cluster.session import ensure_ray

log = logging.getLogger("sapt.sweep")  # the sweep's own lines, as sapt.tuning.sweep writes them
CONSOLE = {"console": True}  # progress for the terminal too (sapt.console), not only the log file

# ASHA keeps the best 1/REDUCTION of the trials at each task count it compares them at.
REDUCTION = 2
INT_KINDS = ("randint", "lograndint")


def start_ray(base: dict, concurrent: int) -> Callable[[], None]:
    """A Ray big enough for ``concurrent`` trials: each needs 1 CPU for its driver plus its Train workers;
    ensure_ray adds room for Ray Data, and refuses trials whose workers together exceed the machine.

    Args:
        base: the sweep's base config as a dict (``num_workers`` and the ``ray`` section are read).
        concurrent: trials running at a time.

    Returns:
        The function that shuts down what was started here (a no-op when Ray was already running).
    """
    if ray.is_initialized():
        return lambda: None
    ensure_ray(base["ray"]["address"], num_workers=concurrent * base["num_workers"],
               cpus_per_worker=base["ray"]["cpus_per_worker"], use_gpu=base["ray"]["use_gpu"], extra_cpus=concurrent)
    return ray.shutdown


def tune_order(driver: Callable[..., None], setup: Any, *, dimensions: Sequence[Any], storage: Path, label: str,
               tasks: Sequence[str], samples: int, concurrent: int, seed: int, metric: str, time_attr: str):
    """One Tuner over one order, new or restored from ``storage/label`` (finished trials are kept).

    Args:
        driver: the trial's plain function, called as ``driver(values, setup, trial_id=..., report=...)``;
            ``values`` are the sampled config keys, ``report(metrics)`` hands Tune one result (ASHA may
            end the trial there).
        setup: what every trial of the order shares (plain values: Tune keeps it in the object store).
        dimensions: the swept keys, objects with ``key``, ``kind`` (a Tune sampler's name) and ``values``.
        storage: Tune's experiments folder; the order's experiment is ``storage/label``.
        label: the order's label (experiment name, log lines).
        tasks: the order's task names: ASHA compares trials after each task, up to all of them.
        samples, concurrent: trials in all and at a time.
        seed: the Optuna search's seed.
        metric: the reported metric to maximise. time_attr: the reported task count.

    Returns:
        Tune's ``ResultGrid`` of the order's trials.
    """
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_parameters(_trainable, driver=driver, setup=setup)
    path = storage / label
    if tune.Tuner.can_restore(str(path)):
        log.info("%s: resuming the Tune experiment in %s (finished trials are kept)", label, path, extra=CONSOLE)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        log.info("%s: %d trials over %s", label, samples, " -> ".join(tasks), extra=CONSOLE)
        tuner = tune.Tuner(
            trainable,
            param_space=domains(dimensions),
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=samples,
                max_concurrent_trials=concurrent,
                search_alg=OptunaSearch(seed=seed),
                # Early stopping between tasks: a trial behind the others after the same number of
                # tasks ends there (ecosystem.md 1.4: one trial is a whole order, reports per task).
                scheduler=ASHAScheduler(time_attr=time_attr, max_t=len(tasks), grace_period=1,
                                        reduction_factor=REDUCTION),
                trial_dirname_creator=_trial_dirname,
                reuse_actors=True,  # the next trial's driver skips importing torch, transformers, DeepSpeed
            ),
            run_config=tune.RunConfig(name=label, storage_path=str(storage), verbose=0,
                                      callbacks=[_ProgressLog(label, metric, time_attr)]),
        )
    return tuner.fit()


def domains(dimensions: Sequence[Any]) -> dict[str, Any]:
    """The swept keys as Tune domains (OptunaSearch turns them into Optuna distributions).

    Args:
        dimensions: objects with ``key``, ``kind`` (``choice``, ``uniform``, ``loguniform``, ``randint``
            or ``lograndint``) and ``values`` (the candidates, or both bounds, inclusive).
    """
    out: dict[str, Any] = {}
    for dim in dimensions:
        if dim.kind == "choice":
            out[dim.key] = tune.choice(list(dim.values))
        elif dim.kind in INT_KINDS:  # Tune's integer upper bound is exclusive; ours is inclusive
            low, high = dim.values
            out[dim.key] = (tune.lograndint if dim.kind == "lograndint" else tune.randint)(low, high + 1)
        else:
            out[dim.key] = getattr(tune, dim.kind)(*dim.values)
    return out


def _trainable(values: dict[str, Any], driver: Callable[..., None], setup: Any) -> None:
    """The Tune trainable: the driver, given this trial's id and Tune's report (the driver needs no Ray)."""
    driver(values, setup, trial_id=tune.get_context().get_trial_id(), report=tune.report)


def _trial_dirname(trial) -> str:
    return trial.trial_id


class _ProgressLog(tune.Callback):
    """Trial progress as log lines on stderr (Tune's own tables are off: stdout stays machine-readable)."""

    def __init__(self, label: str, metric: str, time_attr: str):
        self.label, self.metric, self.time_attr = label, metric, time_attr

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("%s %s: started (%s)", self.label, trial.trial_id, _values(trial.config), extra=CONSOLE)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        log.info("%s %s: after task %s, validation AP %.2f (%s)", self.label, trial.trial_id,
                 result.get(self.time_attr), result.get(self.metric, float("nan")), _values(trial.config),
                 extra=CONSOLE)

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.info("%s %s: ended", self.label, trial.trial_id, extra=CONSOLE)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("%s %s: failed (see %s/error.txt)", self.label, trial.trial_id, trial.path)


def _values(config: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())
