"""The files of a registered version: staging a state folder into per-artifact folders, the sha256
manifest in ``version.json``, verifying downloaded artifacts, and rebuilding a state folder from them."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


from sapt.errors import SaptError

META_FILE = "version.json"  # the "meta" artifact of every version
FORMAT = 2  # 2: any method's state, laid out by the files it declares (1: SAPT pools only)
ALLOWED_SUFFIXES = (".safetensors", ".json")  # nothing that unpickles
KINDS = ("pool", "block", "state")
BLOCKS, STATE = "blocks", "state"  # artifact keys besides "meta"


def block_name(index: int) -> str:
    return f"block-{index:03d}"


def _artifact_keys(meta: dict) -> set[str]:
    kind = meta["kind"]
    if kind == "block":
        return {"meta", "block"}
    if kind == "state" or not meta.get("layout", {}).get("blocks"):
        return {"meta", STATE}
    return {"meta", STATE, BLOCKS}


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
        raise SaptError(f"{META_FILE} missing: not a sapt registry version", source=str(meta_path), field="meta")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise SaptError(f"unreadable: {err}", source=str(meta_path)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise SaptError(f"not a format-{FORMAT} sapt registry version", source=str(meta_path), field="format")
    wanted = _artifact_keys(meta)
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


def _relative(path: str, where: str) -> Path:
    """A declared state path, refused when it could point outside the state folder."""
    rel = Path(path)
    if not path or rel.is_absolute() or ".." in rel.parts:
        raise SaptError(f"state path {path!r} must be relative and inside the state folder", source=where)
    return rel


def _copy(source: Path, dest: Path) -> None:
    if source.is_dir():
        _check_file_types(str(source), source)
        shutil.copytree(source, dest)
    elif source.is_file():
        _check_file_types(str(source), source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    else:
        raise SaptError("missing from the state folder", source=str(source))


@dataclass
class Staged:
    """A state folder split into artifacts: its task blocks and the rest.

    Attributes:
        blocks: one folder per task block, oldest first (``blocks_root/block-NNN``).
        blocks_root: the pool's ``blocks`` artifact (None when the method has no task blocks).
        state: the ``state`` artifact: every shared path, at its place in the state folder.
        layout: where each part goes back when the state folder is rebuilt.
    """

    blocks: list[Path]
    blocks_root: Path | None
    state: Path
    layout: dict


def stage(state_dir: Path, blocks: Sequence[str], shared: Sequence[str], out: Path) -> Staged:
    """Copies the declared parts of a state folder (relative paths) into per-artifact folders.

    Raises:
        SaptError: a declared path is missing, escapes the folder, or holds other than safetensors/JSON.
    """
    if not shared:
        raise SaptError("the method declares no shared state files", source=str(state_dir))
    state = out / STATE
    state.mkdir(parents=True)
    for path in shared:
        _copy(state_dir / _relative(path, str(state_dir)), state / path)
    blocks_root = out / BLOCKS if blocks else None
    staged_blocks = []
    for index, path in enumerate(blocks):
        source = state_dir / _relative(path, str(state_dir))
        if not source.is_dir():
            raise SaptError("block folder missing from the state folder", source=str(source))
        dest = out / BLOCKS / block_name(index)
        _copy(source, dest)
        staged_blocks.append(dest)
    return Staged(blocks=staged_blocks, blocks_root=blocks_root, state=state,
                  layout={"blocks": list(blocks), "shared": list(shared)})


def rebuild_state(artifacts: Mapping[str, str | Path], meta: dict, out_dir: Path) -> Path:
    """Writes the state folder ``load_finished`` reads from a verified pool version's artifacts.

    Returns:
        ``out_dir``: the shared parts and every block back at their declared paths.
    """
    if meta["kind"] != "pool":
        raise SaptError(f"a {meta['kind']} version, not a pool", source=str(artifacts["meta"]), field="kind")
    layout = meta["layout"]
    out_dir.mkdir(parents=True, exist_ok=True)
    state = Path(artifacts[STATE])
    for path in layout["shared"]:
        _copy(state / _relative(path, str(state)), out_dir / path)
    if layout["blocks"]:
        blocks_root = Path(artifacts[BLOCKS])
        found = sorted(p.name for p in blocks_root.iterdir() if p.is_dir())
        wanted = [block_name(i) for i in range(len(layout["blocks"]))]
        if found != wanted:
            raise SaptError(f"expected block folders {wanted[0]}..{wanted[-1]}, found {found[:3]}...",
                            source=str(blocks_root))
        for index, path in enumerate(layout["blocks"]):
            _copy(blocks_root / block_name(index), out_dir / _relative(path, str(blocks_root)))
    return out_dir
