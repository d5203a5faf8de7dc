"""The vocabulary head of a decoder-only backbone, computed only where the loss needs it.

A training batch of a decoder-only model is prompt + answer, left-padded, and the loss covers the
answer tokens only: the head's logits at every prompt position (a 49k-entry vocabulary for SmolLM2)
are computed and thrown away. A forward pre-hook on the causal LM turns a call that has ``labels``
into one with ``logits_to_keep`` = the positions from the one before the batch's first supervised
token to the end, and the labels cut to the same positions. The loss is the same (the same tokens,
the same targets); ``logits`` then cover those last positions only. Calls without labels
(generation, features) are left alone: generation already keeps one position.
"""

from __future__ import annotations

from torch import nn

from sapt.data.collate import IGNORE_INDEX


def _answer_positions_only(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    labels = kwargs.get("labels")
    if labels is None or args or "logits_to_keep" in kwargs:  # a caller that sets it keeps its choice
        return None
    supervised = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(supervised) == 0:
        return None
    first = int(supervised[0])
    if first == 0:
        return None  # every position is needed
    # Position p's logits predict token p + 1: keep from the position before the first label.
    keep = labels.shape[1] - first + 1
    return args, {**kwargs, "logits_to_keep": keep, "labels": labels[:, -keep:]}


def compute_head_only_for_answers(model: nn.Module) -> nn.Module:
    """Installs the hook on a causal LM whose forward takes ``logits_to_keep``; returns the model."""
    model.register_forward_pre_hook(_answer_positions_only, with_kwargs=True)
    return model
