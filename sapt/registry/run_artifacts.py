"""Downloading what a run logged, by artifact URI (``runs:/RUN_ID/path``, ``models:/...``, ``s3://...``),
outside the pool registry: e.g. a task's generator for ``jobs/generate_pseudo.py``."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from sapt.errors import SaptError


def download(uri: str, dest: Path, tracking_uri: str = "", *, what: str = "artifact") -> Path:
    """Downloads the file or folder at ``uri`` into ``dest``; returns its local path.

    Args:
        uri: an MLflow artifact URI.
        dest: an existing folder to download into.
        tracking_uri: the store that ``runs:/`` and ``models:/`` URIs refer to; empty: MLflow's default.
        what: what the artifact is, for the error message ("generator").

    Raises:
        SaptError: MLflow or the artifact store refused (``source`` is the URI).
    """
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                        tracking_uri=tracking_uri or None))
    except (MlflowException, OSError) as err:
        raise SaptError(f"cannot download the {what}: {str(err).splitlines()[0]}", source=uri) from None
