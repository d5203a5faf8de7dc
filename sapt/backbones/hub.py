"""Load a Hugging Face model (hub name or local folder) as a frozen ``Backbone``.

Every failure a user can cause (a typo in a path, a model not in the offline cache, an architecture
LoRA has no target names for) becomes a ``SaptError`` with source ``backbone``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from sapt.backbones.types import Backbone
from sapt.errors import SaptError

logger = logging.getLogger(__name__)

# LoRA goes on the attention query and value projections only (sapt-method.md 1.4). PEFT's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING is the source of truth; LORA_TARGETS holds only
# the types it lacks, and is looked up first, so a later PEFT entry cannot change them unseen.
# Not in PEFT's table: T5 variants, with t5's names.
_SEQ2SEQ_QV = {model_type: ["q", "v"] for model_type in ("umt5", "longt5", "switch_transformers")}
# Not in PEFT's table: q_proj / v_proj, as in bart and llama.
_PROJ_QV = {
    model_type: ["q_proj", "v_proj"]
    for model_type in (
        "mbart", "marian", "pegasus", "blenderbot", "m2m_100", "nllb_moe",
        "qwen2_moe", "qwen3_moe", "olmo", "olmo2", "granite", "smollm3",
    )
}
# Not in PEFT's table: a fused query/key/value projection; LoRA adapts all of it (k included).
_FUSED_QKV = {"phi3": ["qkv_proj"]}
LORA_TARGETS: dict[str, list[str]] = {**_SEQ2SEQ_QV, **_PROJ_QV, **_FUSED_QKV}


def _peft_targets() -> dict[str, list[str]]:
    """PEFT's default LoRA targets by model type, less its regex-only entries (sapt matches name suffixes)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    return {model_type: targets for model_type, targets in peft_defaults.items() if isinstance(targets, list)}


def lora_targets_for(model_type: str) -> list[str]:
    """LoRA target module names for a ``config.model_type``.

    Args:
        model_type: the ``model_type`` field of a transformers config (``"t5"``, ``"llama"``).

    Returns:
        Module-name suffixes for ``peft.LoraConfig(target_modules=...)``: from ``LORA_TARGETS``,
        else from PEFT's defaults.

    Raises:
        SaptError: the architecture has no known query/value projection names.
    """
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    peft_targets = _peft_targets()
    if model_type in peft_targets:
        return list(peft_targets[model_type])
    raise SaptError(
        f"no LoRA target modules known for model_type {model_type!r}; supported: "
        f"{', '.join(sorted({*LORA_TARGETS, *peft_targets}))}",
        source="backbone",
    )


def _resolve(spec: str, cache_dir: str | os.PathLike | None):
    """Finds the model and reads its config only: (where to load from, from_pretrained kwargs, config)."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    is_local = path.is_dir()
    if not is_local and (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.exists()):
        raise SaptError(f"backbone folder {spec!r} does not exist (or is not a folder)", source="backbone")
    where = str(path) if is_local else spec
    kwargs = {} if is_local or cache_dir is None else {"cache_dir": str(cache_dir)}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: only models already in the local cache load)" if offline else ""
        raise SaptError(
            f"cannot load backbone {spec!r}: not a local folder and not loadable from the Hugging Face "
            f"hub or its local cache{hint}: {_first_line(exc)}",
            source="backbone",
        ) from exc
    return where, kwargs, config


def _identity(spec: str, config) -> str:
    """The spec, the hub commit when known, and a hash of the full config."""
    config_hash = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    commit = getattr(config, "_commit_hash", None)
    return f"{spec}@{commit[:12]}-{config_hash}" if commit else f"{spec}@{config_hash}"


def check_hub_backbone(spec: str, *, cache_dir: str | os.PathLike | None = None, prompt_format: str = "raw") -> str:
    """What ``load_hub_backbone`` checks before reading any weights: the model exists and LoRA can adapt it
    (and, for ``prompt_format`` chat, that its tokenizer has a chat template).

    Returns:
        The identity the loaded backbone will have.

    Raises:
        SaptError: as ``load_hub_backbone`` for a missing model or an unknown architecture; chat asked of
            a model without a template (field ``train.prompt_format``).
    """
    where, kwargs, config = _resolve(spec, cache_dir)
    lora_targets_for(config.model_type)
    if prompt_format == "chat":
        from transformers import AutoTokenizer

        from sapt.data.collate import uses_chat_template

        uses_chat_template(AutoTokenizer.from_pretrained(where, **kwargs),
                           bool(getattr(config, "is_encoder_decoder", False)), prompt_format)
    return _identity(spec, config)


def load_hub_backbone(spec: str, *, cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Load a seq2seq or causal LM by hub name or local folder, frozen and in eval mode.

    ``config.is_encoder_decoder`` picks ``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM``.
    Causal LMs get left padding and a pad token (eos, else unk) if they have none.

    Args:
        spec: a local folder (``/models/t5-large``, ``./ckpt``) or a hub name (``google-t5/t5-small``).
        cache_dir: the Hugging Face download cache to read from (default: HF's own).

    Returns:
        The backbone; ``identity`` is the spec plus the hub commit (when known) and a config hash.

    Raises:
        SaptError: the folder does not exist, the name is neither a folder nor in the local cache
            (offline), the files cannot be loaded, or LoRA targets are unknown for the architecture.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    where, kwargs, config = _resolve(spec, cache_dir)
    targets = lora_targets_for(config.model_type)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    auto_model = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = auto_model.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise SaptError(f"cannot load backbone {spec!r}: {_first_line(exc)}", source="backbone") from exc

    if not is_encoder_decoder:
        tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise SaptError(f"tokenizer of {spec!r} has no pad, eos or unk token", source="backbone")
        tokenizer.pad_token = fallback
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    identity = _identity(spec, config)
    logger.info("loaded backbone %s (%s, %s)", spec, config.model_type, identity)
    return Backbone(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=is_encoder_decoder,
        lora_targets=targets,
        identity=identity,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
