"""Warmed-up weights of the embedded tiny backbones, kept in the package: a fresh machine skips the warm-up.

The warm-up (``warmup.span_reconstruction_warmup``) is deterministic on CPU, and it leaves the
embedding frozen at its seeded random init. So only the tensors it changes are stored
(``shipped/NAME.safetensors``, 3-4 MB each); the rest is rebuilt from the spec's seed.
``shipped/NAME.json`` holds the settings they were made for and a digest of the whole warmed-up
state. They are used only when the settings match (the spec, the warm-up version and the
benchmark words it leaves out, not the torch version) and the rebuilt state has that digest;
otherwise the backbone warms up as before.

Regenerate after a change to a spec, the warm-up or the embedded benchmark's words; check that a
fresh warm-up here reproduces them (a few minutes on 2 cores, so not part of the test suite):

    python -m sapt.backbones.shipped tiny-t5 tiny-llama
    python -m sapt.backbones.shipped --check tiny-t5 tiny-llama
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "shipped"
_UNSHIPPED = ("torch",)  # settings that do not decide the weights' values here


def state_digest(model: nn.Module) -> str:
    """sha256 over every tensor of ``model`` (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _UNSHIPPED}


def load_shipped(name: str, settings: dict, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The warmed-up model from the package, or None when none is shipped for these settings.

    Args:
        name: the backbone (``tiny-t5``).
        settings: the warm-up cache's settings for it.
        build: returns the model with its initial (seeded) weights.
    """
    meta_path = SHIPPED_DIR / f"{name}.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["settings"] != _comparable(settings):
        logger.info("the shipped %s weights were made for other settings; warming up instead", name)
        return None
    model = build()
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in load_file(str(SHIPPED_DIR / f"{name}.safetensors")).items():
            if key not in state or state[key].shape != tensor.shape:
                logger.warning("the shipped %s weights do not fit the model (%s); warming up instead", name, key)
                return None
            state[key].copy_(tensor)
    if state_digest(model) != meta["digest"]:
        logger.warning("the shipped %s weights do not rebuild here (the seeded initial weights differ from "
                       "torch %s's); warming up instead", name, meta["made_with_torch"])
        return None
    return model


def write_shipped(name: str, warmed: nn.Module, fresh: nn.Module, settings: dict) -> Path:
    """Stores the tensors in which ``warmed`` differs from ``fresh`` (the same model before warm-up)."""
    SHIPPED_DIR.mkdir(exist_ok=True)
    before = fresh.state_dict()
    changed, seen = {}, set()
    for key, tensor in warmed.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied tensor is stored once
            continue
        seen.add(tensor.data_ptr())
        if not torch.equal(tensor, before[key]):
            changed[key] = tensor.detach().cpu().contiguous()
    path = SHIPPED_DIR / f"{name}.safetensors"
    save_file(changed, str(path))
    meta = {"settings": _comparable(settings), "digest": state_digest(warmed),
            "made_with_torch": torch.__version__.split("+")[0], "tensors": len(changed)}
    (SHIPPED_DIR / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: list[str]) -> int:
    """Writes (or with ``--check`` compares against) the shipped weights of the named backbones."""
    from sapt.backbones.tiny import TINY_SPECS, build_model, warmed_up_fresh

    check = "--check" in argv
    failed = 0
    for name in [a for a in argv if a != "--check"] or ["tiny-t5", "tiny-llama"]:
        spec = TINY_SPECS[name]
        warmed, settings = warmed_up_fresh(spec)
        if check:
            meta = json.loads((SHIPPED_DIR / f"{name}.json").read_text())
            same = meta["settings"] == _comparable(settings) and meta["digest"] == state_digest(warmed)
            print(f"{name}: a fresh warm-up {'reproduces' if same else 'does NOT reproduce'} the shipped weights")
            failed += not same
        else:
            path = write_shipped(name, warmed, build_model(spec), settings)
            print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main(sys.argv[1:]))
