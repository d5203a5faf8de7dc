"""Random-number state of one training process, saved with an epoch checkpoint.

A worker group restarted from epoch k's checkpoint must draw what the lost group would have drawn
next (dropout masks, ARM's reflected batches, a generator's initial weights), or a run with a killed
worker would end with other weights than an uninterrupted one. Saved as safetensors, never pickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RNG_DIR = "rng"  # inside an epoch checkpoint: one file per rank


def rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank-{rank:03d}.safetensors"


def save_rng(directory: Path, rank: int, sampler: random.Random | None = None) -> None:
    """torch's CPU (and current CUDA device's) generator state, and ``sampler``'s, for ``rank``."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    metadata = {"sampler": json.dumps(sampler.getstate()) if sampler is not None else ""}
    path = rng_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def restore_rng(directory: Path, rank: int, sampler: random.Random | None = None) -> bool:
    """Puts back what ``save_rng`` saved for ``rank``; False when the checkpoint has no such file."""
    path = rng_file(directory, rank)
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        saved = (handle.metadata() or {}).get("sampler", "")
    if sampler is not None and saved:
        version, internal, gauss = json.loads(saved)
        sampler.setstate((version, tuple(internal), gauss))
    return True
