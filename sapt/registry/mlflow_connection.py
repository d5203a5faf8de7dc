"""Talking to MLflow: a checked client on a tracking URI, the module-level (fluent) API pointed at
that URI for a while, and the rules for registered-model names and aliases."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from sapt.errors import SaptError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,180}$")
ALIAS_PATTERN = re.compile(r"^[\w\-]{1,255}$")


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Sets environment variables the user has not set, for the duration only."""
    added = [k for k in values if k not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def connect(tracking_uri: str, *, create: bool = False) -> MlflowClient:
    """A client on ``tracking_uri`` (registry included), after one cheap request.

    Raises:
        SaptError: empty URI, a sqlite file that does not exist (unless ``create``), or no answer.
    """
    if not tracking_uri:
        raise SaptError("no MLflow tracking URI given", source="mlflow.tracking_uri")
    if tracking_uri.startswith("sqlite:///") and not create:
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise SaptError(f"no MLflow database at {path}", source="mlflow.tracking_uri")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    # One try, short timeout: an unreachable server must fail in seconds, not after minutes of retries.
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        try:
            client.search_registered_models(max_results=1)
        except Exception as err:
            raise SaptError(f"MLflow registry {tracking_uri} unreachable: {err.__class__.__name__}",
                            source="mlflow.tracking_uri") from None
    return client


@contextlib.contextmanager
def fluent_uris(tracking_uri: str) -> Iterator[None]:
    """Points MLflow's module-level API (``log_model``, ``pyfunc.load_model``, ``models:/`` URIs) at
    ``tracking_uri`` for tracking and registry alike; restores the URIs and their environment
    variables as they were (MLflow's own setters would drop an ``MLFLOW_TRACKING_URI`` set by the user)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_name(name: str, field: str = "pool_name") -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise SaptError(f"{name!r} is not a registry name (letters, digits, _ . -)", source="registry", field=field)
