"""Pool state on disk: every LoRA block as a standard PEFT adapter folder, the router and the soft
prompts as safetensors + JSON. Nothing here unpickles.

    blocks/block-000/adapter_config.json      one PEFT LoRA adapter per task, oldest first;
    blocks/block-000/adapter_model.safetensors ``PeftModel.from_pretrained`` loads it on the bare backbone
    router.safetensors + router.json           projection weights and keys (n, d)
    blocks/block-000/prompt.safetensors        SAPT-Prompt: one (P, d) prompt per block (methods/sapt.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, TaskType
from safetensors.torch import load_file, save_file

from sapt.errors import SaptError
from sapt.pet.lora_pool import PooledLoraLinear
from sapt.pet.router import SharedAttention

BLOCKS_DIR = "blocks"
ROUTER_WEIGHTS, ROUTER_CONFIG = "router.safetensors", "router.json"
_PEFT_PREFIX = "base_model.model."


def block_dir(root: Path, index: int) -> Path:
    return root / BLOCKS_DIR / f"block-{index:03d}"


def block_paths(count: int) -> tuple[str, ...]:
    """The folders of blocks 0..count-1 relative to a state folder (``Method.finished_files``)."""
    return tuple(str(block_dir(Path(), i)) for i in range(count))


def save_lora_block(layers: dict[str, PooledLoraLinear], index: int, out_dir: Path, *, targets: list[str],
                    alpha: float, is_encoder_decoder: bool, base_model: str) -> None:
    """Writes block ``index`` of every pooled layer as one PEFT LoRA adapter folder."""
    rank = next(iter(layers.values())).rank
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.block(index)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, base_model_name_or_path=base_model,
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
    )
    # PEFT keeps target_modules as a set, written in hash order: a sorted list makes the same block
    # always give the same bytes (the registry recognises an already-registered block by its sha256).
    if isinstance(config.target_modules, set):
        config.target_modules = sorted(config.target_modules)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


def _read_block(root: Path, index: int, layers: dict[str, PooledLoraLinear]) -> dict[str, tuple]:
    """Block ``index`` as {layer name: (A, B)}, checked against the pooled layers' shapes.

    Raises:
        SaptError: the block folder is missing, or its layers or shapes do not fit this backbone.
    """
    return read_lora_adapter(block_dir(root, index), layers)


def read_lora_adapter(folder: Path, layers: dict[str, PooledLoraLinear]) -> dict[str, tuple]:
    """A LoRA adapter folder as {layer name: (A, B)}, checked against the pooled layers' shapes.

    Raises:
        SaptError: the folder is missing, or its layers or shapes do not fit this backbone.
    """
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise SaptError("LoRA block missing", source=str(path))
    tensors = load_file(str(path))
    found = {}
    for name, layer in layers.items():
        a = tensors.get(f"{_PEFT_PREFIX}{name}.lora_A.weight")
        b = tensors.get(f"{_PEFT_PREFIX}{name}.lora_B.weight")
        want_a, want_b = (layer.rank, layer.base.in_features), (layer.base.out_features, layer.rank)
        if a is None or b is None or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise SaptError(f"block does not fit layer {name} (rank {layer.rank}) of this backbone",
                            source=str(path), field=f"{name}.lora_A/B")
        found[name] = (a, b)
    return found


def load_lora_blocks(root: Path, count: int, layers: dict[str, PooledLoraLinear]) -> None:
    """Loads blocks 0..count-1 from their adapter folders into the frozen part of each pooled layer."""
    blocks = [_read_block(root, index, layers) for index in range(count)]
    for name, layer in layers.items():
        layer.load_old_blocks([block[name] for block in blocks])


@torch.no_grad()
def load_newest_lora_block(root: Path, index: int, layers: dict[str, PooledLoraLinear], slot: int = 0) -> None:
    """Loads block ``index`` into trainable slot ``slot`` of each pooled layer (0: the first new block)."""
    load_into_slot(_read_block(root, index, layers), layers, slot)


@torch.no_grad()
def load_into_slot(block: dict[str, tuple], layers: dict[str, PooledLoraLinear], slot: int) -> None:
    """Copies a read block ({layer name: (A, B)}) into trainable slot ``slot`` of each pooled layer."""
    for name, (a, b) in block.items():
        rows = slice(slot * layers[name].rank, (slot + 1) * layers[name].rank)
        layers[name].lora_A[rows].copy_(a)
        layers[name].lora_B[:, rows].copy_(b)


def save_router(router: SharedAttention, out_dir: Path) -> None:
    state = {f"projection.{k}": v.detach().float().cpu().contiguous() for k, v in router.projection.state_dict().items()}
    state["keys"] = router.keys().detach().float().cpu().contiguous()
    state["center"] = router.center.detach().float().cpu().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / ROUTER_WEIGHTS))
    (out_dir / ROUTER_CONFIG).write_text(json.dumps(router.describe(), indent=2))


def read_router_config(root: Path) -> dict:
    path = root / ROUTER_CONFIG
    if not path.is_file():
        raise SaptError("router config missing", source=str(path))
    return json.loads(path.read_text())


def load_router_into(router: SharedAttention, root: Path) -> None:
    """Loads a saved router's projection, and its keys as the frozen old keys of ``router``.

    Raises:
        SaptError: the saved router does not fit (embedding size, bottleneck or key count).
    """
    path = root / ROUTER_WEIGHTS
    if not path.is_file():
        raise SaptError("router weights missing", source=str(path))
    state = load_file(str(path))
    keys = state.pop("keys")
    center = state.pop("center", None)  # routers saved before centering existed: zero
    projection = {k.removeprefix("projection."): v for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in router.projection.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in projection.items()}
    if found != expected or keys.shape != (router.num_blocks - 1, router.dim) or (
            center is not None and center.shape != (router.dim,)):
        center_shape = None if center is None else tuple(center.shape)
        raise SaptError(f"saved router does not fit: projection {found}, keys {tuple(keys.shape)}, center "
                        f"{center_shape}; expected {expected}, ({router.num_blocks - 1}, {router.dim}) and "
                        f"({router.dim},)", source=str(path))
    router.projection.load_state_dict(projection)
    router.old_keys = keys.to(router.old_keys.device, router.old_keys.dtype)
    if center is not None:
        router.center.copy_(center)
