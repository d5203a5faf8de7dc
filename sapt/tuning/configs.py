"""Run configs of a sweep, from its base config: each trial's (sampled values, scored on validation, its
own folder, the sweep's MLflow experiment, nothing registered) and the best one's (scored on test)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sapt.config import RunConfig, load_config, set_dotted, validate
from sapt.errors import SaptError
from sapt.tuning.space import SearchSpace


def base_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The validated config as a plain dict, with local paths made absolute: trials run in Tune's
    trial folders, and the best config must work from wherever it is run.

    Raises:
        SaptError: what ``load_config`` or the method's own argument check rejects.
    """
    run = load_config(source, overrides)  # method_args checked there too
    raw = run.model_dump(mode="json")
    for key in ("data_dir", "single_results"):
        if raw[key]:
            raw[key] = str(Path(raw[key]).resolve())
    if Path(raw["backbone"]).exists():  # a local model folder, not a hub name or embedded:NAME
        raw["backbone"] = str(Path(raw["backbone"]).resolve())
    uri = raw["mlflow"]["tracking_uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raw["mlflow"]["tracking_uri"] = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    storage = raw["ray"]["storage_path"]
    if storage and "://" not in storage:
        raw["ray"]["storage_path"] = str(Path(storage).resolve())
    return raw


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted key of ``values`` set, as ``--set KEY=VALUE`` would."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def check_space(space: SearchSpace, base: dict[str, Any]) -> None:
    """Fails before any trial starts if a key is unknown or a bound is invalid for the base config.

    Raises:
        SaptError: naming the space file and the key, with the config's own complaint.
    """
    for dim in space.dimensions:
        for value in dim.extremes():
            try:
                validate(with_values(base, {dim.key: value}))
            except SaptError as err:
                raise SaptError(f"{dim.kind} value {value!r} does not fit method {base['method']} ({err})",
                                source=space.source, field=dim.key) from None


def trial_config(base: dict[str, Any], values: dict[str, Any], *, order: str | list[str], output_dir: Path,
                 tracking_uri: str, experiment: str) -> RunConfig:
    """One trial: the base config with the sampled values, scored on the validation split (the sweep's
    objective; test is never used to choose), logged to the sweep's experiment, registering nothing."""
    raw = with_values(base, values)
    raw.update(order=order, output_dir=str(output_dir))
    raw["eval"]["split"] = "val"
    raw["mlflow"].update(tracking_uri=tracking_uri, experiment=experiment, register_pool=False, pool_name="")
    return validate(raw, where=f"trial config in {output_dir}")


def best_config(base: dict[str, Any], values: dict[str, Any], *, order: str | list[str],
                output_dir: str) -> dict[str, Any]:
    """The config to run for real: the base config with the chosen values, scored on test."""
    raw = with_values(base, values)
    raw.update(order=order, output_dir=output_dir)
    raw["eval"]["split"] = "test"
    return validate(raw, where="best config").model_dump(mode="json")
