"""Reading the pool registry: which tasks are registered (what ``--resume`` reads), listing and
showing versions, aliases, and downloading or loading a version."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sapt.errors import SaptError
from sapt.registry.mlflow_connection import ALIAS_PATTERN, check_name, connect, fluent_uris
from sapt.registry.pool_artifacts import FORMAT, rebuild_state, verify_artifacts
from sapt.registry.pool_versions import REGISTRY_TAG, model_versions


# -- what --resume reads --------------------------------------------------------------------------

def complete_pool_versions(tracking_uri: str, pool_name: str, order: Sequence[str], *,
                           source_run_id: str | None = None, method: str | None = None,
                           backbone_identity: str | None = None) -> dict[int, int]:
    """{0-based task index: pool version} of the tasks whose pool version was registered (READY).

    Block and state versions alone never count: an interrupted registration leaves at most those.
    Filters: the order always; the source run, method and backbone identity when given.
    """
    check_name(pool_name)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return {}  # a first run: its embedded store does not exist yet
    client = connect(tracking_uri)
    wanted = {"kind": "pool", "order": json.dumps([str(n) for n in order]), "format": str(FORMAT)}
    if source_run_id is not None:
        wanted["source_run_id"] = source_run_id
    if method is not None:
        wanted["method"] = method
    if backbone_identity is not None:
        wanted["backbone_identity"] = backbone_identity
    try:
        client.get_registered_model(pool_name)
    except MlflowException:
        return {}
    out: dict[int, int] = {}
    for version in model_versions(client, pool_name):
        if version.status == "READY" and all(version.tags.get(k) == v for k, v in wanted.items()):
            out.setdefault(int(version.tags["task_index"]), int(version.version))
    return out


def last_complete_task(tracking_uri: str, pool_name: str, order: Sequence[str], *,
                       source_run_id: str | None = None, method: str | None = None,
                       backbone_identity: str | None = None) -> int | None:
    """The highest 0-based task index with a registered pool version (see ``complete_pool_versions``);
    None when there is none. ``--resume`` restarts after it, from ``download_state`` of that version."""
    done = complete_pool_versions(tracking_uri, pool_name, order, source_run_id=source_run_id, method=method,
                                  backbone_identity=backbone_identity)
    return max(done) if done else None


# -- reading ------------------------------------------------------------------------------------

def _resolve(client: MlflowClient, tracking_uri: str, name: str, version_or_alias: str | int):
    """The model version a number or an alias names.

    Raises:
        SaptError: no such registered model (field ``name``), version (``version``) or alias (``alias``).
    """
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise SaptError(f"no registered model {name!r} in {tracking_uri}", source=f"models:/{name}",
                        field="name") from None
    ref = str(version_or_alias)
    if ref.isdigit():
        try:
            return client.get_model_version(name, ref)
        except MlflowException:
            raise SaptError(f"model {name!r} has no version {ref} in {tracking_uri}", source=f"models:/{name}/{ref}",
                            field="version") from None
    try:
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise SaptError(f"model {name!r} has no alias {ref!r} in {tracking_uri}", source=f"models:/{name}@{ref}",
                        field="alias") from None


def _version_dict(version) -> dict:
    return {
        "name": version.name, "version": int(version.version), "uri": f"models:/{version.name}/{version.version}",
        "status": version.status, "aliases": sorted(getattr(version, "aliases", []) or []),
        "tags": dict(version.tags), "source": version.source, "run_id": version.run_id,
        "created": version.creation_timestamp,
    }


def _aliases(model) -> dict[str, int]:
    return {alias: int(version) for alias, version in sorted((model.aliases or {}).items())}


def list_pools(tracking_uri: str) -> list[dict]:
    """Every sapt registered model (pools, their blocks and states) as plain dicts, by name."""
    client = connect(tracking_uri)
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        for model in page:
            kind = model.tags.get(REGISTRY_TAG)
            if kind is None:
                continue
            versions = model_versions(client, model.name)
            out.append({
                "name": model.name, "kind": kind, "pool": model.tags.get("pool", model.name),
                "versions": len(versions), "latest_version": int(versions[-1].version) if versions else None,
                "aliases": _aliases(model),
                "order": json.loads(versions[-1].tags["order"]) if versions and "order" in versions[-1].tags else None,
                "method": versions[-1].tags.get("method") if versions else None,
                "backbone": versions[-1].tags.get("backbone") if versions else None,
            })
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda m: m["name"])


def show(tracking_uri: str, name: str, version_or_alias: str | int | None = None) -> dict:
    """One version (by number or alias) as a plain dict; without one, the model and all its versions."""
    client = connect(tracking_uri)
    if version_or_alias is not None:
        return _version_dict(_resolve(client, tracking_uri, name, version_or_alias))
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise SaptError(f"no registered model {name!r} in {tracking_uri}", source=f"models:/{name}",
                        field="name") from None
    return {"name": model.name, "tags": dict(model.tags), "aliases": _aliases(model),
            "versions": [_version_dict(v) for v in model_versions(client, name)]}


def promote(tracking_uri: str, name: str, version: str | int, alias: str) -> dict:
    """Points ``alias`` (e.g. ``champion``) at ``version``; returns the version as ``show`` does.

    Raises:
        SaptError: unknown model or version, or an alias MLflow reserves or refuses (field ``alias``).
    """
    client = connect(tracking_uri)
    if not str(version).isdigit():
        raise SaptError(f"{version!r} is not a version number", source=f"models:/{name}", field="version")
    if not ALIAS_PATTERN.match(alias) or alias.lower() == "latest" or re.match(r"^[vV]\d+$", alias):
        raise SaptError(f"{alias!r} cannot be an alias (letters, digits, _ and -; not 'latest' nor v<N>)",
                        source=f"models:/{name}", field="alias")
    found = _resolve(client, tracking_uri, name, version)
    client.set_registered_model_alias(name, alias, found.version)
    return _version_dict(client.get_model_version(name, found.version))


def _download(client: MlflowClient, tracking_uri: str, name: str, version_or_alias, dst: Path) -> tuple[dict, dict]:
    """Downloads a version; returns (artifact paths by key, verified version.json)."""
    from mlflow.models import Model

    version = _resolve(client, tracking_uri, name, version_or_alias)
    with fluent_uris(tracking_uri):  # models:/ URIs resolve through the global registry URI
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                         dst_path=str(dst)))
    config = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    artifacts = {key: local / info["path"] for key, info in config.items()}
    return artifacts, verify_artifacts(artifacts)


def download_state(tracking_uri: str, pool_name: str, version_or_alias: str | int, out_dir: str | Path) -> Path:
    """The state folder of a pool version, for ``method.build`` (``--resume``) or ``load_finished``.

    Raises:
        SaptError: unknown model/version/alias, not a pool version, or artifacts that fail verification.
    """
    client = connect(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sapt-download-") as tmp:
        artifacts, meta = _download(client, tracking_uri, pool_name, version_or_alias, Path(tmp))
        return rebuild_state(artifacts, meta, Path(out_dir))


def download_block(tracking_uri: str, blocks_name: str, version_or_alias: str | int, out_dir: str | Path) -> Path:
    """A block version's folder (sapt-lora: a PEFT adapter for ``PeftModel.from_pretrained``), copied
    to ``out_dir``; returns ``out_dir``."""
    client = connect(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sapt-download-") as tmp:
        artifacts, meta = _download(client, tracking_uri, blocks_name, version_or_alias, Path(tmp))
        if meta["kind"] != "block":
            raise SaptError(f"a {meta['kind']} version, not a block", source=f"models:/{blocks_name}", field="kind")
        shutil.copytree(artifacts["block"], out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def load_pool(tracking_uri: str, name: str, version_or_alias: str | int, *,
              model_config: Mapping[str, Any] | None = None):
    """``mlflow.pyfunc.load_model`` of a version, with SaptErrors for unknown names, versions and aliases.

    Args:
        model_config: load-time overrides read by ``pool_model.py``: ``device``, ``cache_dir``, ``data_dir``.
    """
    client = connect(tracking_uri)
    version = _resolve(client, tracking_uri, name, version_or_alias)
    with fluent_uris(tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version.version}",
                                        model_config=dict(model_config) if model_config else None)
