"""A frozen backbone whose pooled LoRA blocks all apply with weight 1: h = W x + sum_j s B_j A_j x.

O-LoRA's model: the equal-weight sum of every task's LoRA, with no task id and no routing. The
pooled layers (``lora_pool.py``) keep old blocks frozen and train the newest; a forward in
training mode can also return each layer's overlap and norm terms (``OverlapTerms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sapt.pet.lora_pool import OverlapTerms, PooledLoraLinear, Routing


@dataclass
class SummedOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    overlaps: list[OverlapTerms]  # one per pooled layer call (training mode only)


class SummedLoraModel(nn.Module):
    """Backbone with pooled LoRA layers already injected, every block weighted 1.

    Args:
        backbone: the HF model after ``inject_lora_pool``.
        routing: the object the pooled layers read their weights from.
        layers: the pooled layers, by module name.
    """

    def __init__(self, backbone: nn.Module, routing: Routing, layers: dict[str, PooledLoraLinear]):
        super().__init__()
        self.backbone = backbone
        self.routing = routing
        self.layer_names = list(layers)
        self.num_blocks = next(iter(layers.values())).num_blocks

    def _all_ones(self, input_ids: torch.Tensor) -> None:
        self.routing.weights = torch.ones(input_ids.shape[0], self.num_blocks, device=input_ids.device)

    def forward(self, input_ids, attention_mask, labels=None) -> SummedOutput:
        self._all_ones(input_ids)
        self.routing.overlaps = [] if self.training else None
        try:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return SummedOutput(loss=out.loss, logits=out.logits, overlaps=self.routing.overlaps or [])
        finally:
            self.routing.overlaps = None

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        self._all_ones(input_ids)
        return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
