"""The files of a registered version: staging a state folder into per-artifact folders, the sha256
manifest in ``version.json``, verifying downloaded artifacts, and rebuilding a state folder from them."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from sapt.errors import SaptError

META_FILE = "version.json"  # the "meta" artifact of every version
FORMAT = 1
ALLOWED_SUFFIXES = (".safetensors", ".json")  # nothing that unpickles
METHODS = ("sapt-lora", "sapt-prompt")
KINDS = ("pool", "block", "router")
_ARTIFACT_KEYS = {"pool": ("router", "blocks"), "block": ("block",), "router": ("router",)}  # besides "meta"

# State folder names (sapt/pet/pool_files.py, sapt/methods/sapt.py); repeated here so that this
# module does not import torch-heavy method code for bookkeeping.
_STATE_FILE, _SELECTOR_DIR = "sapt.json", "selector"
_ROUTER_FILES = ("router.safetensors", "router.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PROMPTS_FILE, _PROMPT_FILE = "prompts.safetensors", "prompt.safetensors"


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



def read_state(state_dir: Path, method: str, task_index: int, task_names: Sequence[str]) -> dict:
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


def stage(state_dir: Path, state: dict, out: Path) -> _Staged:
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
