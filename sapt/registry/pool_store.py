"""Registering adapter pools in the MLflow model registry: after each finished task, the method's task
blocks, its shared state and the whole finished model (the pool), each as a pyfunc model version
(``pool_model.py``, "models from code"). Any method: its state is laid out by the files it declares
(``Method.finished_files``), so nothing here names a method.
Reading is in ``pool_reader.py``, the version files in ``pool_artifacts.py``, the MLflow client in
``mlflow_connection.py``; their public names are re-exported here (``__all__``).

Layout (``docs/registry.md``), for a pool named P:

    P-blocks  one version per task block (methods with task-owned blocks: SAPT, O-LoRA): the block's
              folder, e.g. a PEFT LoRA adapter (sapt-prompt: its prompt tensor)
    P-state   one version per task: the shared rest (SAPT: router + sapt.json; SeqLoRA: its adapter)
    P         one version per task: state + every block so far, self-contained and servable;
              aliases ``after-tNN`` (1-based: after-t01 = after the first task) and ``newest``

Commit point: the pool version is registered last, with all its tags in the same call, and it is
the only thing ``last_complete_task`` (what ``--resume`` reads) trusts. Block and state versions
of an interrupted task are found again by their content hash and reused, so retrying creates no
duplicates. Artifacts are safetensors and JSON only, listed with their sha256 in ``version.json``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sapt.errors import SaptError
from sapt.registry.mlflow_connection import check_name, connect, fluent_uris
from sapt.registry.pool_artifacts import (
    ALLOWED_SUFFIXES, BLOCKS, FORMAT, KINDS, META_FILE, STATE, content_hash, manifest, rebuild_state, stage,
    verify_artifacts,
)
from sapt.registry.pool_reader import (
    complete_pool_versions, download_block, download_state, last_complete_task, list_pools, load_pool, promote, show,
)
from sapt.registry.pool_versions import REGISTRY_TAG, model_versions

__all__ = [
    # registering (this module)
    "POOL_MODEL_CODE", "NEWEST_ALIAS", "DEFAULT_EXPERIMENT", "Generation", "PoolVersion", "blocks_model",
    "state_model", "after_alias", "register_task",
    # re-exported: artifacts (pool_artifacts), the registry tag (pool_versions), reading (pool_reader)
    "META_FILE", "FORMAT", "ALLOWED_SUFFIXES", "KINDS", "manifest", "content_hash", "verify_artifacts",
    "rebuild_state", "REGISTRY_TAG", "complete_pool_versions", "last_complete_task", "list_pools", "show",
    "promote", "download_state", "download_block", "load_pool",
]

POOL_MODEL_CODE = Path(__file__).with_name("pool_model.py")
NEWEST_ALIAS = "newest"
DEFAULT_EXPERIMENT = "sapt-registry"  # where logged models go when there is no source run


@dataclass(frozen=True)
class Generation:
    """How the run tokenized and decoded at evaluation; stored so a loaded pool answers the same.

    Attributes:
        max_source_len, max_target_len: the Collator's limits (``train.max_source_len`` ...).
        max_new_tokens: greedy decoding length (``eval.max_new_tokens``).
        batch_size: prompts per ``generate`` call (``eval.batch_size``).
        prompt_format: ``train.prompt_format`` (raw prompts or the chat template).
    """

    max_source_len: int
    max_target_len: int
    max_new_tokens: int
    batch_size: int = 64
    prompt_format: str = "raw"

    @classmethod
    def from_run(cls, run) -> "Generation":
        """From a ``sapt.config.RunConfig``."""
        return cls(run.train.max_source_len, run.train.max_target_len, run.eval.max_new_tokens, run.eval.batch_size,
                   run.train.prompt_format)


@dataclass(frozen=True)
class PoolVersion:
    """What one task's registration produced (or found already registered).

    Attributes:
        name: the pool's registered-model name; blocks and state live in ``{name}-blocks``/``-state``.
        task_index: 0-based position in the order.
        pool: version of ``name``.
        state: version of ``{name}-state``.
        blocks: versions of ``{name}-blocks`` for the state's blocks, oldest first (empty without blocks).
        created: False when the pool version already existed (idempotent re-registration).
    """

    name: str
    task_index: int
    pool: int
    state: int
    blocks: tuple[int, ...]
    created: bool


def blocks_model(pool_name: str) -> str:
    return f"{pool_name}-blocks"


def state_model(pool_name: str) -> str:
    return f"{pool_name}-state"


def after_alias(task_index: int) -> str:
    """The pool alias set after 0-based task ``task_index``: after-t01 is after the first task."""
    return f"after-t{task_index + 1:02d}"


# -- registering ----------------------------------------------------------------------------------

def _requirements() -> list[str]:
    """Explicit pins (MLflow would otherwise import-scan the code). The ``sapt`` package itself must
    be installed where the model is loaded: it is not on PyPI, so it is not listed."""
    pins = []
    for package in ("mlflow", "torch", "transformers", "peft", "safetensors", "pandas", "pydantic"):
        version = importlib_metadata.version(package).split("+")[0]
        pins.append(f"{package}=={version}")
    return pins


def _signature(kind: str):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    outputs = [ColSpec(Array(DataType.double), "block_weights")]
    if kind != "state":
        outputs.insert(0, ColSpec(DataType.string, "answer"))
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "input")]), outputs=Schema(outputs))


def _experiment(client: MlflowClient, tracking_uri: str, source_run_id: str | None) -> str:
    """The source run's experiment; without one, ``sapt-registry`` (artifacts beside a sqlite file)."""
    if source_run_id:
        try:
            return client.get_run(source_run_id).info.experiment_id
        except MlflowException:
            raise SaptError(f"no run {source_run_id!r} in {tracking_uri}", source="source_run_id") from None
    found = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(DEFAULT_EXPERIMENT, artifact_location=location)


def _ensure_registered(client: MlflowClient, name: str, kind: str, pool_name: str) -> None:
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={REGISTRY_TAG: kind, "pool": pool_name})
        except MlflowException:  # created meanwhile by someone else
            pass
        return
    if model.tags.get(REGISTRY_TAG) not in (None, kind):
        raise SaptError(f"registered model {name!r} is a sapt {model.tags[REGISTRY_TAG]}, not a {kind}",
                        source="pool_name")


def _find(client: MlflowClient, name: str, **tags: str) -> Any | None:
    """The oldest READY version whose tags include all of ``tags``."""
    for version in model_versions(client, name):
        if version.status == "READY" and all(version.tags.get(k) == v for k, v in tags.items()):
            return version
    return None


def _log_version(model_name: str, kind: str, artifacts: dict[str, Path], meta: dict, tags: dict[str, str],
                 *, experiment_id: str, source_run_id: str | None, work: Path) -> int:
    """One pyfunc logged model with ``artifacts`` + version.json, registered as a new version of
    ``model_name`` with ``tags`` in the same request. Returns the version number."""
    meta_dir = work / f"meta-{kind}-{len(list(work.glob('meta-*')))}"
    meta_dir.mkdir()
    meta_path = meta_dir / META_FILE
    meta_path.write_text(json.dumps({**meta, "kind": kind, "files": manifest(artifacts)}, indent=2))
    logged = mlflow.initialize_logged_model(name=f"sapt-{kind}", source_run_id=source_run_id,
                                            experiment_id=experiment_id, tags={"sapt.kind": kind})
    with warnings.catch_warnings():
        # An input example would make MLflow load the backbone and predict at logging time: left out.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=f"sapt-{kind}",
            python_model=str(POOL_MODEL_CODE),
            artifacts={"meta": str(meta_path), **{k: str(v) for k, v in artifacts.items()}},
            registered_model_name=model_name,
            pip_requirements=_requirements(),
            signature=_signature(kind),
            metadata={"sapt_kind": kind, "backbone": meta["backbone"]["spec"],
                      "backbone_identity": meta["backbone"]["identity"]},
            tags=tags,
            model_id=logged.model_id,
        )
    return int(info.registered_model_version)


def register_task(
    tracking_uri: str,
    *,
    pool_name: str,
    state_dir: str | Path,
    blocks: Sequence[str],
    shared: Sequence[str],
    task_index: int,
    task_names: Sequence[str],
    method: str,
    method_args: Mapping[str, Any],
    backbone_spec: str,
    backbone_identity: str,
    benchmark: str,
    metrics: Mapping[str, float | None],
    source_run_id: str | None,
    generation: Generation,
    pet: Mapping[str, Any],
    backbone_args: Mapping[str, Any] | None = None,
) -> PoolVersion:
    """Registers a finished task: its blocks, the shared state, then the pool made of them (the commit point).

    Args:
        tracking_uri: MLflow tracking URI (its model registry is used too).
        pool_name: the pool's registered-model name (e.g. ``sapt-<order>``).
        state_dir: the method's saved state after the task (a local folder, ``method.save`` output).
        blocks, shared: what ``Method.finished_files`` declares: paths relative to ``state_dir`` of
            its task blocks (oldest first) and of everything else.
        task_index: 0-based index of the task just finished.
        task_names: the order.
        method, method_args: the method's name and its validated knobs (defaults included).
        pet: the run's ``pet`` section (rank, alpha, dropout), to rebuild the method.
        backbone_spec, backbone_identity: ``Backbone.name`` and ``Backbone.identity``; the backbone
            is referenced by spec (never copied) and checked against the identity when loaded.
        benchmark: a label for the data (e.g. ``embedded``, ``long``).
        metrics: the numbers at this point (AP, F.Ra, ...); None values are left out.
        source_run_id: the sequence's MLflow run; part of the idempotence key, and its experiment
            holds the logged models.
        generation: the Collator and decoding settings the run evaluated with.
        backbone_args: extra ``load_backbone`` keywords needed to rebuild the same backbone
            (``data_dir``, ``exclude_tasks`` for ``embedded:minilm-t5``).

    Returns:
        The versions; ``created`` is False when this (pool, task, run, order) was already registered.

    Raises:
        SaptError: bad state folder or names, unreachable registry, unknown source run, or this task
            of this run already registered with different weights.
    """
    check_name(pool_name)
    state_dir = Path(state_dir)
    names = [str(n) for n in task_names]
    if not 0 <= task_index < len(names):
        raise SaptError(f"task index {task_index} outside an order of {len(names)} tasks", source="task_index")
    if len(blocks) > task_index + 1:
        raise SaptError(f"{len(blocks)} blocks after task {task_index} (0-based): at most one per task",
                        source=str(state_dir), field="blocks")
    client = connect(tracking_uri, create=True)
    experiment_id = _experiment(client, tracking_uri, source_run_id)
    order = json.dumps(names)
    run = source_run_id or ""
    models = [(pool_name, "pool"), (state_model(pool_name), "state")]
    if blocks:  # methods without task-owned blocks get no (empty) blocks model
        models.append((blocks_model(pool_name), "blocks"))
    for name, kind in models:
        _ensure_registered(client, name, kind, pool_name)

    with tempfile.TemporaryDirectory(prefix="sapt-registry-") as tmp:
        work = Path(tmp)
        staged = stage(state_dir, blocks, shared, work)
        base_meta = {
            "format": FORMAT, "pool": pool_name, "method": method, "method_args": dict(method_args),
            "pet": dict(pet), "layout": staged.layout,
            "backbone": {"spec": backbone_spec, "identity": backbone_identity, "args": dict(backbone_args or {})},
            "generation": {"max_source_len": generation.max_source_len, "max_target_len": generation.max_target_len,
                           "max_new_tokens": generation.max_new_tokens, "batch_size": generation.batch_size,
                           "prompt_format": generation.prompt_format},
            "benchmark": benchmark, "order": names,
        }
        base_tags = {
            "pool": pool_name, "benchmark": benchmark, "order": order, "method": method,
            "method_args": json.dumps(dict(method_args), sort_keys=True), "backbone": backbone_spec,
            "backbone_identity": backbone_identity, "source_run_id": run, "format": str(FORMAT),
        }
        metric_tags = {f"metric.{k}": repr(float(v)) for k, v in metrics.items() if v is not None}

        pool_artifacts = {STATE: staged.state, **({BLOCKS: staged.blocks_root} if staged.blocks else {})}
        pool_sha = content_hash(manifest(pool_artifacts))
        existing = _find(client, pool_name, kind="pool", order=order, task_index=str(task_index), source_run_id=run,
                         format=str(FORMAT))
        if existing is not None:
            if existing.tags.get("sha256") != pool_sha:
                raise SaptError(f"task {task_index} of run {run!r} is already registered with other weights "
                                f"(version {existing.version}); delete it or register under another run",
                                source=f"models:/{pool_name}/{existing.version}", field="sha256")
            _set_aliases(client, pool_name, int(existing.version), task_index)
            return PoolVersion(pool_name, task_index, int(existing.version), int(existing.tags["state_version"]),
                               tuple(json.loads(existing.tags["block_versions"])), created=False)

        with fluent_uris(tracking_uri):
            block_versions = []
            for index, block in enumerate(staged.blocks):
                artifacts = {"block": block}
                sha = content_hash(manifest(artifacts))
                key = {"order": order, "task_index": str(index), "sha256": sha, "format": str(FORMAT)}
                found = (_find(client, blocks_model(pool_name), **key, source_run_id=run)
                         or _find(client, blocks_model(pool_name), **key))
                if found is not None:
                    block_versions.append(int(found.version))
                    continue
                # Normally only the newest block is new; older ones are back-filled when missing.
                tags = {**base_tags, "kind": "block", "task_index": str(index), "task_name": names[index],
                        "sha256": sha, **(metric_tags if index == task_index else {"backfilled": "true"})}
                meta = {**base_meta, "task_index": index, "task_name": names[index], "block_index": index}
                block_versions.append(_log_version(blocks_model(pool_name), "block", artifacts, meta, tags,
                                                   experiment_id=experiment_id, source_run_id=source_run_id,
                                                   work=work))

            task_tags = {**base_tags, "task_index": str(task_index), "task_name": names[task_index], **metric_tags,
                         "blocks": str(len(staged.blocks))}
            task_meta = {**base_meta, "task_index": task_index, "task_name": names[task_index],
                         "blocks": len(staged.blocks)}
            state_artifacts = {STATE: staged.state}
            state_sha = content_hash(manifest(state_artifacts))
            found = _find(client, state_model(pool_name), kind="state", order=order, task_index=str(task_index),
                          source_run_id=run, sha256=state_sha, format=str(FORMAT))
            state_version = int(found.version) if found is not None else _log_version(
                state_model(pool_name), "state", state_artifacts, task_meta,
                {**task_tags, "kind": "state", "sha256": state_sha},
                experiment_id=experiment_id, source_run_id=source_run_id, work=work)

            # The commit point: one request creates the version with every tag.
            made_of = {"state_version": state_version, "block_versions": block_versions}
            pool_version = _log_version(
                pool_name, "pool", pool_artifacts, {**task_meta, "made_of": made_of},
                {**task_tags, "kind": "pool", "sha256": pool_sha, "state_version": str(state_version),
                 "block_versions": json.dumps(block_versions)},
                experiment_id=experiment_id, source_run_id=source_run_id, work=work)
    _set_aliases(client, pool_name, pool_version, task_index)
    return PoolVersion(pool_name, task_index, pool_version, state_version, tuple(block_versions), created=True)


def restore_aliases(tracking_uri: str, pool_name: str, version: int, task_index: int) -> None:
    """Sets a registered task's aliases again: a run killed between its two alias writes left one out."""
    _set_aliases(connect(tracking_uri), pool_name, version, task_index)


def _set_aliases(client: MlflowClient, pool_name: str, version: int, task_index: int) -> None:
    """after-tNN on this version; ``newest`` on the highest version number (never moved back)."""
    client.set_registered_model_alias(pool_name, after_alias(task_index), str(version))
    try:
        current = int(client.get_model_version_by_alias(pool_name, NEWEST_ALIAS).version)
    except MlflowException:
        current = 0
    if version > current:
        client.set_registered_model_alias(pool_name, NEWEST_ALIAS, str(version))
