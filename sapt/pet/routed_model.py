"""A frozen backbone whose PET pool (LoRA blocks or soft prompts) is mixed per input by a router.

The router reads the raw token embeddings of the prompt only: the encoder input for T5, the
prompt part of the left-padded sequence (labels == -100) for decoder-only models. One weight
vector per input, computed once per forward or ``generate`` call and used by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sapt.pet.lora_pool import Routing
from sapt.pet.prompt_pool import PromptPool
from sapt.pet.router import SharedAttention
from sapt.pet.soft_prompt import IGNORE_INDEX, generate_prompted, prompted_inputs


# How the block weights of an input are chosen (the no-sa and no-alignment ablations change them).
TrainWeights = Literal["attention", "newest"]  # newest: one-hot on the block being trained
Selection = Literal["attention", "top1", "selector"]  # selector: a separately trained router


@dataclass
class RoutedOutput:
    loss: torch.Tensor | None
    weights: torch.Tensor  # (B, n) the block weights the pool was mixed with
    log_weights: torch.Tensor  # (B, n) the router's log-weights for the same inputs
    selector_log_weights: torch.Tensor | None  # (B, n) the selector's, when there is one
    reflect_log_weights: list[torch.Tensor]  # router log-weights of each extra input batch, (B_i, n)
    reflect_selector_log_weights: list[torch.Tensor]  # the selector's for the same batches


class RoutedModel(nn.Module):
    """Backbone + router + pool.

    Args:
        backbone: the HF model, with pooled LoRA layers already injected when ``prompts`` is None.
        router: the shared attention.
        routing: the object the pooled LoRA layers read their weights from.
        is_encoder_decoder: T5 style (True) or decoder-only (False).
        prompts: the soft-prompt pool of SAPT-Prompt; None for SAPT-LoRA.
        train_weights, selection: see the Literal types above.
        selector: the separate router of the no-alignment ablation.
    """

    def __init__(self, backbone: nn.Module, router: SharedAttention, routing: Routing, *, is_encoder_decoder: bool,
                 prompts: PromptPool | None = None, train_weights: TrainWeights = "attention",
                 selection: Selection = "attention", selector: SharedAttention | None = None):
        super().__init__()
        self.backbone = backbone
        self.router = router
        self.prompts = prompts
        self.selector = selector
        self.routing = routing
        self.is_encoder_decoder = is_encoder_decoder
        self.train_weights = train_weights
        self.selection = selection

    @property
    def num_blocks(self) -> int:
        return self.router.num_blocks

    def _query_inputs(self, input_ids, attention_mask, labels=None):
        embeddings = self.backbone.get_input_embeddings()(input_ids)
        mask = attention_mask
        if labels is not None and not self.is_encoder_decoder:
            mask = attention_mask * (labels == IGNORE_INDEX)  # the prompt part, not the answer
        return embeddings, mask

    def router_log_weights(self, input_ids, attention_mask, labels=None, *, router: SharedAttention | None = None):
        """log alpha of each input: (B, n), from the router (or the given one)."""
        embeddings, mask = self._query_inputs(input_ids, attention_mask, labels)
        logits = (router or self.router)(embeddings, mask)
        return torch.log_softmax(logits.float(), dim=-1)

    def pooled_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        """What the router pools from each input, before centering and projection: (B, d)."""
        return self.router.pooled(*self._query_inputs(input_ids, attention_mask))

    def queries(self, input_ids, attention_mask) -> torch.Tensor:
        """The router's projected query of each input: (B, d)."""
        return self.router.query(*self._query_inputs(input_ids, attention_mask))

    def block_weights(self, input_ids, attention_mask, labels=None,
                      log_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The weights the pool is mixed with for these inputs, in the current train/eval mode: (B, n)."""
        if self.training and self.train_weights == "newest":
            weights = torch.zeros(input_ids.shape[0], self.num_blocks, device=input_ids.device)
            weights[:, -1] = 1.0
            return weights
        if not self.training and self.selection == "selector":
            return self.router_log_weights(input_ids, attention_mask, labels, router=self.selector).exp()
        if log_weights is None:
            log_weights = self.router_log_weights(input_ids, attention_mask, labels)
        if self.training or self.selection == "attention":
            return log_weights.exp()
        return nn.functional.one_hot(log_weights.argmax(dim=-1), self.num_blocks).float()

    def _with_prompt(self, input_ids, attention_mask, weights, labels=None) -> dict:
        """Backbone keyword arguments: token ids, or embeddings with the mixed prompt in front."""
        if self.prompts is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return prompted_inputs(self.backbone, input_ids, attention_mask, self.prompts(weights), labels,
                               is_encoder_decoder=self.is_encoder_decoder)

    def forward(self, input_ids, attention_mask, labels=None, reflect=None, router_frozen: bool = False) -> RoutedOutput:
        """The LM loss, plus router log-weights of any ``reflect`` batches (ARM's pseudo inputs).

        Args:
            reflect: a list of (input_ids, attention_mask) batches that pass only through the
                embedding lookup, pooling and the router, never through the backbone.
        """
        log_weights = self.router_log_weights(input_ids, attention_mask, labels)
        if router_frozen:  # the blocks learn under the weights the router gives, the router does not move
            log_weights = log_weights.detach()
        weights = self.block_weights(input_ids, attention_mask, labels, log_weights)
        self.routing.weights = weights
        out = self.backbone(**self._with_prompt(input_ids, attention_mask, weights, labels))
        reflect = reflect or []
        with_selector = self.selector is not None
        return RoutedOutput(
            loss=out.loss,
            weights=weights,
            log_weights=log_weights,
            selector_log_weights=self.router_log_weights(input_ids, attention_mask, labels, router=self.selector)
            if with_selector else None,
            reflect_log_weights=[self.router_log_weights(ids, mask) for ids, mask in reflect],
            reflect_selector_log_weights=[self.router_log_weights(ids, mask, router=self.selector)
                                          for ids, mask in reflect] if with_selector else [],
        )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        """Backbone generation with this input's block weights; returns prompt + answer ids for
        decoder-only models, as a plain ``generate`` would."""
        weights = self.block_weights(input_ids, attention_mask)
        self.routing.weights = weights
        if self.prompts is not None:
            return generate_prompted(self.backbone, input_ids, attention_mask, self.prompts(weights),
                                     is_encoder_decoder=self.is_encoder_decoder, **kwargs)
        return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
