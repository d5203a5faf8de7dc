"""Sentence features from a backbone: the mean of the prompt's last hidden states.

What a selector reads when it needs more than raw embeddings: Dynamic ConPET's selector (with its
own LoRA on), L2P's query and EPI's class statistics (the frozen backbone, no PET on). T5: the
encoder's output over the real tokens. Decoder-only: the last layer over the prompt part of the
left-padded sequence (labels == IGNORE_INDEX marks it in a training batch). Shapes: B batch,
T tokens, d hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from sapt.pet.soft_prompt import IGNORE_INDEX


def mean_pooled_hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor | None = None, *, is_encoder_decoder: bool) -> torch.Tensor:
    """(B, d): the last hidden states averaged over each input's prompt tokens."""
    mask = attention_mask
    if is_encoder_decoder:
        hidden_BTd = backbone.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        if labels is not None:
            mask = attention_mask * (labels == IGNORE_INDEX)  # the prompt part, not the answer
        hidden_BTd = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    weights_BT = mask.to(hidden_BTd.dtype)
    return (hidden_BTd * weights_BT[..., None]).sum(1) / weights_BT.sum(1, keepdim=True).clamp(min=1)
