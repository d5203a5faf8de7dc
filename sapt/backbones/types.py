"""What every backbone loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class Backbone:
    """A frozen pretrained model with its tokenizer.

    Attributes:
        name: the spec it was loaded from (``embedded:tiny-t5``, ``t5-small``, ``/models/llama``).
        model: a ``transformers`` PreTrainedModel (seq2seq or causal LM), in eval mode, all
            parameters with ``requires_grad=False``.
        tokenizer: a ``transformers`` tokenizer with a pad token set (left padding for causal LMs).
        is_encoder_decoder: True for T5-style models, False for LLaMA-style decoder-only ones.
        lora_targets: module-name suffixes that LoRA adapts (the attention query and value
            projections: ``["q", "v"]`` for T5, ``["q_proj", "v_proj"]`` for LLaMA).
        identity: a short string that changes whenever the weights could differ (hub name and
            revision, a path and a content hash, or an embedded name and its build hash).
    """

    name: str
    model: nn.Module
    tokenizer: object
    is_encoder_decoder: bool
    lora_targets: list[str]
    identity: str
