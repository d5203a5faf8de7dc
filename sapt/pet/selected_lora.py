"""A frozen backbone with one LoRA expert per task and a learned selector that picks the top-k experts
for each input (Dynamic ConPET's PET-module selector, baselines.md 1.3).

The experts and the selector's own LoRA share the pooled LoRA layers (``lora_pool.py``): blocks
0..n-1 are the experts, the last block is the selector's. A selector pass runs the backbone with
only the selector block on, mean-pools the last hidden states of the prompt and scores them with a
linear head (one row per task); an expert pass runs it with the chosen experts on (weight 1/k each).
Shapes: B batch, T tokens, d hidden size, n experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sapt.pet.features import mean_pooled_hidden
from sapt.pet.lora_pool import PooledLoraLinear, Routing


@dataclass
class SelectedOutput:
    loss: torch.Tensor  # the LM loss of the new task's items through the newest expert
    selector_logits: torch.Tensor  # (B, n) for every item of the batch
    selector_loss: torch.Tensor  # cross-entropy of the selector on the items' task ids (0 when n == 1)


class SelectedLoraModel(nn.Module):
    """Backbone + pooled expert/selector LoRA layers + the selector's task head.

    Args:
        backbone: the HF model after ``inject_lora_pool`` (blocks: n experts, then the selector).
        routing: the object the pooled layers read their weights from.
        layers: the pooled layers, by module name.
        head: ``nn.Linear(d, n)``: one logit per expert.
        top_k: experts used per input at test time.
        is_encoder_decoder: T5 style (True) or decoder-only (False).
    """

    def __init__(self, backbone: nn.Module, routing: Routing, layers: dict[str, PooledLoraLinear], head: nn.Linear,
                 *, top_k: int, is_encoder_decoder: bool):
        super().__init__()
        self.backbone = backbone
        self.routing = routing
        self.head = head
        self.top_k = top_k
        self.is_encoder_decoder = is_encoder_decoder
        self.pool_blocks = next(iter(layers.values())).num_blocks

    @property
    def num_experts(self) -> int:
        return self.head.out_features

    def _pool_weights(self, expert_weights_Bn: torch.Tensor) -> torch.Tensor:
        """Expert weights (B, n) as pool weights (B, pool blocks): the selector block off."""
        out = expert_weights_Bn.new_zeros(expert_weights_Bn.shape[0], self.pool_blocks)
        out[:, : expert_weights_Bn.shape[1]] = expert_weights_Bn
        return out

    def selector_logits(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        """(B, n): the head's scores of the mean-pooled last hidden states, selector block only."""
        on = torch.zeros(input_ids.shape[0], self.pool_blocks, device=input_ids.device)
        on[:, -1] = 1.0
        self.routing.weights = on
        pooled_Bd = mean_pooled_hidden(self.backbone, input_ids, attention_mask, labels,
                                       is_encoder_decoder=self.is_encoder_decoder)
        return self.head(pooled_Bd.to(self.head.weight.dtype))

    def block_weights(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        """(B, n): weight 1/k on each input's top-k experts by the selector, 0 elsewhere."""
        logits = self.selector_logits(input_ids, attention_mask, labels)
        k = min(self.top_k, self.num_experts)
        top = logits.topk(k, dim=-1).indices
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, top, 1.0 / k)

    def forward(self, input_ids, attention_mask, labels=None, task=None, memory=None) -> SelectedOutput:
        """Training: the selector learns every item's task id; the newest expert learns the new task's
        items (teacher forcing with k = 1 sends a remembered item only to its own frozen expert,
        which gives no gradient, so those items skip the expert pass)."""
        logits = self.selector_logits(input_ids, attention_mask, labels)
        if task is not None and self.num_experts > 1:
            selector_loss = F.cross_entropy(logits.float(), task)
        else:
            selector_loss = logits.sum() * 0.0
        new = torch.ones_like(input_ids[:, 0], dtype=torch.bool) if memory is None else ~memory
        newest = torch.zeros(int(new.sum()), self.num_experts, device=input_ids.device)
        newest[:, -1] = 1.0
        self.routing.weights = self._pool_weights(newest)
        out = self.backbone(input_ids=input_ids[new], attention_mask=attention_mask[new],
                            labels=None if labels is None else labels[new])
        return SelectedOutput(loss=out.loss, selector_logits=logits, selector_loss=selector_loss)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        weights = self.block_weights(input_ids, attention_mask)
        self.routing.weights = self._pool_weights(weights)
        return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
