"""Backbone loading: ``embedded:<name>`` from the built-in registry, anything else from the HF hub."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

from sapt.backbones.types import Backbone
from sapt.errors import SaptError

EMBEDDED_PREFIX = "embedded:"


def _tiny(name: str) -> Callable[..., Backbone]:
    def load(*, cache_dir: str | os.PathLike | None = None, **_unused_data_args) -> Backbone:
        from sapt.backbones.tiny import load_tiny

        return load_tiny(name, cache_dir=cache_dir)

    return load


def _minilm(
    *,
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    exclude_tasks: Sequence[str] = (),
) -> Backbone:
    from sapt.backbones.minilm import build_minilm_seq2seq

    return build_minilm_seq2seq(cache_dir=cache_dir, data_dir=data_dir, exclude_tasks=exclude_tasks)


def _smollm2(*, cache_dir: str | os.PathLike | None = None, **_unused_data_args) -> Backbone:
    from sapt.backbones.smollm2 import load_smollm2

    return load_smollm2(cache_dir=cache_dir)


# Name (without the prefix) -> loader(cache_dir=...). Loaders import lazily: listing names is free.
# A new embedded backbone is one row here, e.g. "minilm-t5" (MiniLM encoder + small T5 decoder,
# warmed up with warmup.span_reconstruction_warmup and cached with warmup.cached_weights).
_EMBEDDED: dict[str, Callable[..., Backbone]] = {
    "tiny-t5": _tiny("tiny-t5"),
    "tiny-llama": _tiny("tiny-llama"),
    "minilm-t5": _minilm,
    "smollm2-135m": _smollm2,
}

EMBEDDED_BACKBONES: list[str] = [EMBEDDED_PREFIX + name for name in _EMBEDDED]


def load_backbone(
    spec: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    exclude_tasks: Sequence[str] = (),
) -> Backbone:
    """Load a frozen backbone by spec.

    Args:
        spec: ``"embedded:<name>"`` for a built-in backbone (see ``EMBEDDED_BACKBONES``), else a HF
            hub name or a local model folder.
        cache_dir: embedded backbones: where warmed-up weights are cached (default
            ``$SAPT_CACHE_DIR`` or ``~/.cache/sapt/backbones``); hub models: the HF download cache.
        data_dir: ``embedded:minilm-t5`` only: the CL_Benchmark folder whose training inputs warm up
            its decoder (None: a synthetic corpus; real-data runs should pass it). Others ignore it.
        exclude_tasks: ``embedded:minilm-t5`` only: task folder names kept out of the warm-up (the
            evaluated tasks). Others ignore it.

    Returns:
        The backbone, all parameters frozen, in eval mode.

    Raises:
        SaptError: unknown embedded name (the message lists the known ones), or any load failure
            of a hub model (see ``hub.load_hub_backbone``).
    """
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if name not in _EMBEDDED:
            raise SaptError(
                f"unknown embedded backbone {spec!r}; known: {', '.join(EMBEDDED_BACKBONES)}",
                source="backbone",
            )
        backbone = _EMBEDDED[name](cache_dir=cache_dir, data_dir=data_dir, exclude_tasks=exclude_tasks)
    else:
        from sapt.backbones.hub import load_hub_backbone

        backbone = load_hub_backbone(spec, cache_dir=cache_dir)
    if not backbone.is_encoder_decoder and "logits_to_keep" in inspect.signature(backbone.model.forward).parameters:
        from sapt.backbones.answer_head import compute_head_only_for_answers

        compute_head_only_for_answers(backbone.model)
    return backbone


def check_backbone(
    spec: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    exclude_tasks: Sequence[str] = (),
    prompt_format: str = "raw",
) -> str:
    """Fails fast (SaptError) on a backbone that cannot load, without loading big weights; returns
    the identity the workers' backbone will have (what registered pools are checked against).

    An embedded backbone is loaded, which runs its one-off warm-up here, on the driver, so the
    workers of this node find it cached. A hub model only has its config and LoRA targets checked
    (and its tokenizer, for ``prompt_format`` chat): the weights are for the workers to load.
    ``prompt_format`` (``train.prompt_format``): chat needs a decoder-only backbone with a chat template.
    """
    from sapt.data.collate import uses_chat_template

    if spec.startswith(EMBEDDED_PREFIX):
        backbone = load_backbone(spec, cache_dir=cache_dir, data_dir=data_dir, exclude_tasks=exclude_tasks)
        uses_chat_template(backbone.tokenizer, backbone.is_encoder_decoder, prompt_format)
        return backbone.identity
    from sapt.backbones.hub import check_hub_backbone

    return check_hub_backbone(spec, cache_dir=cache_dir, prompt_format=prompt_format)


__all__ = ["EMBEDDED_BACKBONES", "Backbone", "check_backbone", "load_backbone"]
