"""SAPT adapter pools in the MLflow model registry: after each finished task, its block, the router and
the whole pool, each as a pyfunc model version (``pool_model.py``, "models from code").

Layout (``docs/registry.md``), for a pool named P:

    P-blocks  one version per task: the task's PEFT LoRA adapter folder (sapt-prompt: its prompt tensor)
    P-router  one version per task: router.safetensors + router.json + sapt.json
    P         one version per task: router + every block so far, self-contained and servable;
              aliases ``after-tNN`` (1-based: after-t01 = after the first task) and ``newest``

Commit point: the pool version is registered last, with all its tags in the same call, and it is
the only thing ``last_complete_task`` (what ``--resume`` reads) trusts. Block and router versions
of an interrupted task are found again by their content hash and reused, so retrying creates no
duplicates. Artifacts are safetensors and JSON only, listed with their sha256 in ``version.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from sapt.errors import SaptError

POOL_MODEL_CODE = Path(__file__).with_name("pool_model.py")
META_FILE = "version.json"  # the "meta" artifact of every version
FORMAT = 1
ALLOWED_SUFFIXES = (".safetensors", ".json")  # nothing that unpickles
METHODS = ("sapt-lora", "sapt-prompt")
KINDS = ("pool", "block", "router")
_ARTIFACT_KEYS = {"pool": ("router", "blocks"), "block": ("block",), "router": ("router",)}  # besides "meta"
NEWEST_ALIAS = "newest"
REGISTRY_TAG = "sapt_registry"  # registered-model tag: pool | blocks | router
DEFAULT_EXPERIMENT = "sapt-registry"  # where logged models go when there is no source run

# State folder names (sapt/pet/pool_files.py, sapt/methods/sapt.py); repeated here so that this
# module does not import torch-heavy method code for bookkeeping.
_STATE_FILE, _SELECTOR_DIR = "sapt.json", "selector"
_ROUTER_FILES = ("router.safetensors", "router.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PROMPTS_FILE, _PROMPT_FILE = "prompts.safetensors", "prompt.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,180}$")
_ALIAS = re.compile(r"^[\w\-]{1,255}$")


@dataclass(frozen=True)
class Generation:
    """How the run tokenized and decoded at evaluation; stored so a loaded pool answers the same.

    Attributes:
        max_source_len, max_target_len: the Collator's limits (``train.max_source_len`` ...).
        max_new_tokens: greedy decoding length (``eval.max_new_tokens``).
        batch_size: prompts per ``generate`` call (``eval.batch_size``).
    """

    max_source_len: int
    max_target_len: int
    max_new_tokens: int
    batch_size: int = 64

    @classmethod
    def from_run(cls, run) -> "Generation":
        """From a ``sapt.config.RunConfig``."""
        return cls(run.train.max_source_len, run.train.max_target_len, run.eval.max_new_tokens, run.eval.batch_size)


@dataclass(frozen=True)
class PoolVersion:
    """What one task's registration produced (or found already registered).

    Attributes:
        name: the pool's registered-model name; blocks and router live in ``{name}-blocks``/``-router``.
        task_index: 0-based position in the order.
        pool: version of ``name``.
        router: version of ``{name}-router``.
        blocks: versions of ``{name}-blocks`` for blocks 0..task_index, oldest first.
        created: False when the pool version already existed (idempotent re-registration).
    """

    name: str
    task_index: int
    pool: int
    router: int
    blocks: tuple[int, ...]
    created: bool


def blocks_model(pool_name: str) -> str:
    return f"{pool_name}-blocks"


def router_model(pool_name: str) -> str:
    return f"{pool_name}-router"


def after_alias(task_index: int) -> str:
    """The pool alias set after 0-based task ``task_index``: after-t01 is after the first task."""
    return f"after-t{task_index + 1:02d}"


# -- connecting ---------------------------------------------------------------------------------

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


def _connect(tracking_uri: str, *, create: bool = False) -> MlflowClient:
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
def _fluent_uris(tracking_uri: str) -> Iterator[None]:
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


def _check_name(name: str, field: str = "pool_name") -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SaptError(f"{name!r} is not a registry name (letters, digits, _ . -)", source="registry", field=field)


# -- files: staging, manifest, verification, rebuilding a state folder ---------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def manifest(artifacts: Mapping[str, Path]) -> dict[str, str]:
    """``{"<artifact key>/<relative path>": sha256}`` over every file of every artifact but the meta file."""
    out = {}
    for key, root in sorted(artifacts.items()):
        if key == "meta":
            continue
        for path in _files(root):
            out[f"{key}/{path.relative_to(root).as_posix()}"] = _sha256(path)
    return out


def content_hash(files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(files.items()))).encode()).hexdigest()


def _check_file_types(key: str, root: Path) -> None:
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise SaptError("artifacts must be plain files", source=str(path), field=key)
        if path.is_file() and path.suffix not in ALLOWED_SUFFIXES:
            raise SaptError(f"only safetensors and JSON files may be pool artifacts, found {path.name!r} "
                            "(refusing to load anything that could unpickle)", source=str(path), field=key)


def verify_artifacts(artifacts: Mapping[str, str | Path]) -> dict:
    """Checks a version's artifacts before anything is loaded from them; returns its ``version.json``.

    Only safetensors and JSON files, exactly the files listed in ``version.json`` with the same sha256.

    Raises:
        SaptError: naming the offending file.
    """
    artifacts = {key: Path(path) for key, path in artifacts.items()}
    meta_path = artifacts.get("meta")
    if meta_path is None or not meta_path.is_file():
        raise SaptError(f"{META_FILE} missing: not a SAPT registry version", source=str(meta_path), field="meta")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise SaptError(f"unreadable: {err}", source=str(meta_path)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise SaptError(f"not a format-{FORMAT} SAPT registry version", source=str(meta_path), field="format")
    wanted = {"meta", *_ARTIFACT_KEYS[meta["kind"]]}
    if set(artifacts) != wanted:
        raise SaptError(f"artifacts {sorted(artifacts)}, expected {sorted(wanted)}", source=str(meta_path),
                        field="artifacts")
    for key, root in artifacts.items():
        if key != "meta":
            _check_file_types(key, root)
    found, listed = manifest(artifacts), meta.get("files", {})
    if found != listed:
        changed = sorted(k for k in set(found) | set(listed) if found.get(k) != listed.get(k))
        raise SaptError(f"artifact files differ from those registered (sha256): {', '.join(changed[:5])}",
                        source=str(meta_path.parent), field="files")
    return meta



def _read_state(state_dir: Path, method: str, task_index: int, task_names: Sequence[str]) -> dict:
    path = state_dir / _STATE_FILE
    if method not in METHODS:
        raise SaptError(f"the pool registry holds SAPT states only ({', '.join(METHODS)})", source="method")
    if not 0 <= task_index < len(task_names):
        raise SaptError(f"task index {task_index} outside an order of {len(task_names)} tasks", source="task_index")
    if not path.is_file():
        raise SaptError(f"not a {method} state folder", source=str(path))
    state = json.loads(path.read_text())
    if state.get("method") != method:
        raise SaptError(f"state of method {state.get('method')!r}, not {method!r}", source=str(path), field="method")
    if state.get("blocks") != task_index + 1:
        raise SaptError(f"{state.get('blocks')} blocks, but task {task_index} (0-based) needs {task_index + 1}",
                        source=str(path), field="blocks")
    if len(state.get("targets", [])) != state["blocks"]:
        raise SaptError("the newest block has no attention target: saved mid-task", source=str(path), field="targets")
    return state


def _copy_files(source: Path, names: Sequence[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (source / name).is_file():
            raise SaptError("missing from the state folder", source=str(source / name))
        shutil.copyfile(source / name, dest / name)


@dataclass
class _Staged:
    blocks: list[Path]  # one folder per block, oldest first
    blocks_root: Path
    router: Path
    pet: dict


def _stage(state_dir: Path, state: dict, out: Path) -> _Staged:
    """Copies the whitelisted files of a state folder into per-artifact folders."""
    count = state["blocks"]
    blocks_root = out / "blocks"
    blocks = [blocks_root / f"block-{i:03d}" for i in range(count)]
    pet: dict = {}
    if state["method"] == "sapt-lora":
        for index, dest in enumerate(blocks):
            _copy_files(state_dir / "blocks" / dest.name, _ADAPTER_FILES, dest)
            config = json.loads((dest / "adapter_config.json").read_text())
            this = {"lora_r": int(config["r"]), "lora_alpha": float(config["lora_alpha"])}
            if pet and this != pet:
                raise SaptError(f"block {index} has rank/alpha {this}, block 0 {pet}", source=str(dest))
            pet = this
    else:
        path = state_dir / _PROMPTS_FILE
        if not path.is_file():
            raise SaptError("prompt pool missing", source=str(path))
        prompts = load_file(str(path))["prompts"]  # (n, P, d)
        if prompts.shape[0] != count:
            raise SaptError(f"{prompts.shape[0]} prompts for {count} blocks", source=str(path))
        for index, dest in enumerate(blocks):
            dest.mkdir(parents=True)
            save_file({"prompt": prompts[index].contiguous()}, str(dest / _PROMPT_FILE))
    router = out / "router"
    _copy_files(state_dir, (*_ROUTER_FILES, _STATE_FILE), router)
    if (state_dir / _SELECTOR_DIR).is_dir():  # the no-alignment ablation's separate selector
        _copy_files(state_dir / _SELECTOR_DIR, _ROUTER_FILES, router / _SELECTOR_DIR)
    return _Staged(blocks=blocks, blocks_root=blocks_root, router=router, pet=pet)


def rebuild_state(artifacts: Mapping[str, str | Path], meta: dict, out_dir: Path) -> Path:
    """Writes the state folder ``load_finished`` reads from a verified pool version's artifacts.

    Returns:
        ``out_dir``, holding sapt.json, the router, and blocks/ (sapt-lora) or prompts.safetensors.
    """
    if meta["kind"] != "pool":
        raise SaptError(f"a {meta['kind']} version, not a pool", source=str(artifacts["meta"]), field="kind")
    blocks_root, router = Path(artifacts["blocks"]), Path(artifacts["router"])
    blocks = sorted(p for p in blocks_root.iterdir() if p.is_dir())
    if [p.name for p in blocks] != [f"block-{i:03d}" for i in range(meta["blocks"])]:
        raise SaptError(f"expected blocks block-000..block-{meta['blocks'] - 1:03d}", source=str(blocks_root))
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta["method"] == "sapt-lora":
        for block in blocks:
            _copy_files(block, _ADAPTER_FILES, out_dir / "blocks" / block.name)
    else:
        import torch

        prompts = [load_file(str(b / _PROMPT_FILE)).get("prompt") for b in blocks]
        for block, prompt in zip(blocks, prompts):
            if prompt is None or prompt.dim() != 2 or prompt.shape != prompts[0].shape:
                raise SaptError("expected one (P, d) tensor 'prompt', the same shape in every block",
                                source=str(block / _PROMPT_FILE))
        stacked = torch.stack(prompts)  # (n, P, d)
        save_file({"prompts": stacked.contiguous()}, str(out_dir / _PROMPTS_FILE))
    _copy_files(router, (*_ROUTER_FILES, _STATE_FILE), out_dir)
    if (router / _SELECTOR_DIR).is_dir():
        _copy_files(router / _SELECTOR_DIR, _ROUTER_FILES, out_dir / _SELECTOR_DIR)
    state = json.loads((out_dir / _STATE_FILE).read_text())
    if state.get("blocks") != meta["blocks"] or state.get("method") != meta["method"]:
        raise SaptError(f"sapt.json says {state.get('method')} with {state.get('blocks')} blocks, version.json "
                        f"{meta['method']} with {meta['blocks']}", source=str(router / _STATE_FILE))
    return out_dir


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
    if kind != "router":
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
        raise SaptError(f"registered model {name!r} is a SAPT {model.tags[REGISTRY_TAG]}, not a {kind}",
                        source="pool_name")


def _versions(client: MlflowClient, name: str) -> list:
    """Every version of ``name`` (READY or not), oldest first."""
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda v: int(v.version))


def _find(client: MlflowClient, name: str, **tags: str) -> Any | None:
    """The oldest READY version whose tags include all of ``tags``."""
    for version in _versions(client, name):
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
    backbone_args: Mapping[str, Any] | None = None,
) -> PoolVersion:
    """Registers a finished task: its block, the router, then the pool made of them (the commit point).

    Args:
        tracking_uri: MLflow tracking URI (its model registry is used too).
        pool_name: the pool's registered-model name (e.g. ``sapt-<order>``).
        state_dir: the method's saved state after the task (a local folder, ``method.save`` output).
        task_index: 0-based index of the task just finished; the state holds task_index + 1 blocks.
        task_names: the order.
        method, method_args: ``sapt-lora`` or ``sapt-prompt`` and its validated knobs.
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
    _check_name(pool_name)
    state_dir = Path(state_dir)
    names = [str(n) for n in task_names]
    state = _read_state(state_dir, method, task_index, names)
    client = _connect(tracking_uri, create=True)
    experiment_id = _experiment(client, tracking_uri, source_run_id)
    order = json.dumps(names)
    run = source_run_id or ""
    for name, kind in ((pool_name, "pool"), (blocks_model(pool_name), "blocks"), (router_model(pool_name), "router")):
        _ensure_registered(client, name, kind, pool_name)

    with tempfile.TemporaryDirectory(prefix="sapt-registry-") as tmp:
        work = Path(tmp)
        staged = _stage(state_dir, state, work)
        base_meta = {
            "format": FORMAT, "pool": pool_name, "method": method, "method_args": dict(method_args),
            "pet": staged.pet,
            "backbone": {"spec": backbone_spec, "identity": backbone_identity, "args": dict(backbone_args or {})},
            "generation": {"max_source_len": generation.max_source_len, "max_target_len": generation.max_target_len,
                           "max_new_tokens": generation.max_new_tokens, "batch_size": generation.batch_size},
            "benchmark": benchmark, "order": names, "ablation": state.get("ablation", "none"),
        }
        base_tags = {
            "pool": pool_name, "benchmark": benchmark, "order": order, "method": method,
            "method_args": json.dumps(dict(method_args), sort_keys=True), "backbone": backbone_spec,
            "backbone_identity": backbone_identity, "source_run_id": run,
        }
        metric_tags = {f"metric.{k}": repr(float(v)) for k, v in metrics.items() if v is not None}

        pool_artifacts = {"router": staged.router, "blocks": staged.blocks_root}
        pool_sha = content_hash(manifest(pool_artifacts))
        existing = _find(client, pool_name, kind="pool", order=order, task_index=str(task_index), source_run_id=run)
        if existing is not None:
            if existing.tags.get("sha256") != pool_sha:
                raise SaptError(f"task {task_index} of run {run!r} is already registered with other weights "
                                f"(version {existing.version}); delete it or register under another run",
                                source=f"models:/{pool_name}/{existing.version}", field="sha256")
            _set_aliases(client, pool_name, int(existing.version), task_index)
            return PoolVersion(pool_name, task_index, int(existing.version), int(existing.tags["router_version"]),
                               tuple(json.loads(existing.tags["block_versions"])), created=False)

        with _fluent_uris(tracking_uri):
            block_versions = []
            for index, block in enumerate(staged.blocks):
                artifacts = {"block": block}
                sha = content_hash(manifest(artifacts))
                key = {"order": order, "task_index": str(index), "sha256": sha}
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
                         "blocks": str(task_index + 1)}
            task_meta = {**base_meta, "task_index": task_index, "task_name": names[task_index],
                         "blocks": task_index + 1}
            router_artifacts = {"router": staged.router}
            router_sha = content_hash(manifest(router_artifacts))
            found = _find(client, router_model(pool_name), kind="router", order=order, task_index=str(task_index),
                          source_run_id=run, sha256=router_sha)
            router_version = int(found.version) if found is not None else _log_version(
                router_model(pool_name), "router", router_artifacts, task_meta,
                {**task_tags, "kind": "router", "sha256": router_sha},
                experiment_id=experiment_id, source_run_id=source_run_id, work=work)

            # The commit point: one request creates the version with every tag.
            made_of = {"router_version": router_version, "block_versions": block_versions}
            pool_version = _log_version(
                pool_name, "pool", pool_artifacts, {**task_meta, "made_of": made_of},
                {**task_tags, "kind": "pool", "sha256": pool_sha, "router_version": str(router_version),
                 "block_versions": json.dumps(block_versions)},
                experiment_id=experiment_id, source_run_id=source_run_id, work=work)
    _set_aliases(client, pool_name, pool_version, task_index)
    return PoolVersion(pool_name, task_index, pool_version, router_version, tuple(block_versions), created=True)


def _set_aliases(client: MlflowClient, pool_name: str, version: int, task_index: int) -> None:
    """after-tNN on this version; ``newest`` on the highest version number (never moved back)."""
    client.set_registered_model_alias(pool_name, after_alias(task_index), str(version))
    try:
        current = int(client.get_model_version_by_alias(pool_name, NEWEST_ALIAS).version)
    except MlflowException:
        current = 0
    if version > current:
        client.set_registered_model_alias(pool_name, NEWEST_ALIAS, str(version))


# -- what --resume reads --------------------------------------------------------------------------

def complete_pool_versions(tracking_uri: str, pool_name: str, order: Sequence[str], *,
                           source_run_id: str | None = None, method: str | None = None,
                           backbone_identity: str | None = None) -> dict[int, int]:
    """{0-based task index: pool version} of the tasks whose pool version was registered (READY).

    Block and router versions alone never count: an interrupted registration leaves at most those.
    Filters: the order always; the source run, method and backbone identity when given.
    """
    _check_name(pool_name)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return {}  # a first run: its embedded store does not exist yet
    client = _connect(tracking_uri)
    wanted = {"kind": "pool", "order": json.dumps([str(n) for n in order])}
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
    for version in _versions(client, pool_name):
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
    """Every SAPT registered model (pools, their blocks and routers) as plain dicts, by name."""
    client = _connect(tracking_uri)
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        for model in page:
            kind = model.tags.get(REGISTRY_TAG)
            if kind is None:
                continue
            versions = _versions(client, model.name)
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
    client = _connect(tracking_uri)
    if version_or_alias is not None:
        return _version_dict(_resolve(client, tracking_uri, name, version_or_alias))
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise SaptError(f"no registered model {name!r} in {tracking_uri}", source=f"models:/{name}",
                        field="name") from None
    return {"name": model.name, "tags": dict(model.tags), "aliases": _aliases(model),
            "versions": [_version_dict(v) for v in _versions(client, name)]}


def promote(tracking_uri: str, name: str, version: str | int, alias: str) -> dict:
    """Points ``alias`` (e.g. ``champion``) at ``version``; returns the version as ``show`` does.

    Raises:
        SaptError: unknown model or version, or an alias MLflow reserves or refuses (field ``alias``).
    """
    client = _connect(tracking_uri)
    if not str(version).isdigit():
        raise SaptError(f"{version!r} is not a version number", source=f"models:/{name}", field="version")
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.match(r"^[vV]\d+$", alias):
        raise SaptError(f"{alias!r} cannot be an alias (letters, digits, _ and -; not 'latest' nor v<N>)",
                        source=f"models:/{name}", field="alias")
    found = _resolve(client, tracking_uri, name, version)
    client.set_registered_model_alias(name, alias, found.version)
    return _version_dict(client.get_model_version(name, found.version))


def _download(client: MlflowClient, tracking_uri: str, name: str, version_or_alias, dst: Path) -> tuple[dict, dict]:
    """Downloads a version; returns (artifact paths by key, verified version.json)."""
    from mlflow.models import Model

    version = _resolve(client, tracking_uri, name, version_or_alias)
    with _fluent_uris(tracking_uri):  # models:/ URIs resolve through the global registry URI
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
    client = _connect(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sapt-download-") as tmp:
        artifacts, meta = _download(client, tracking_uri, pool_name, version_or_alias, Path(tmp))
        return rebuild_state(artifacts, meta, Path(out_dir))


def download_block(tracking_uri: str, blocks_name: str, version_or_alias: str | int, out_dir: str | Path) -> Path:
    """A block version's folder (sapt-lora: a PEFT adapter for ``PeftModel.from_pretrained``), copied
    to ``out_dir``; returns ``out_dir``."""
    client = _connect(tracking_uri)
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
    client = _connect(tracking_uri)
    version = _resolve(client, tracking_uri, name, version_or_alias)
    with _fluent_uris(tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version.version}",
                                        model_config=dict(model_config) if model_config else None)
