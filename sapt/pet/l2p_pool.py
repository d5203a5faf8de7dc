"""L2P (Wang et al., CVPR 2022): a shared pool of M soft prompts, one key each, from which every input
picks its top-N prompts by the cosine of its query with the keys, in training and at test alike.

query(x)  = mean-pooled last hidden states of the frozen backbone, no prompt, dropout off   (B, d)
selected  = top-N of cos(query, key_m) over the M keys                                      (B, N)
prompt(x) = the N selected prompts, concatenated in selection order                         (B, N*L, d)
pull      = sum over the selected keys of (1 - cos(query, key)), averaged over the batch

Selection is an argmax: the keys learn only through the pull term, the prompts only through the
LM loss of the inputs that selected them. Every input is selected for on its own (no batch-wise
majority vote at test, which would let one input's prompts depend on the rest of the batch).
Shapes: B batch, M pool size, N selected, L prompt length, d hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sapt.pet.features import mean_pooled_hidden
from sapt.pet.soft_prompt import generate_prompted, prompted_inputs


class L2PPool(nn.Module):
    """M prompts of L vectors and M keys, all trainable.

    Args:
        prompts: initial prompts, (M, L, d).
        keys: initial keys, (M, d).
        top_n: prompts selected per input.
    """

    def __init__(self, prompts: torch.Tensor, keys: torch.Tensor, top_n: int):
        super().__init__()
        if prompts.shape[0] != keys.shape[0] or prompts.shape[2] != keys.shape[1]:
            raise ValueError(f"prompts {tuple(prompts.shape)} and keys {tuple(keys.shape)} do not pair up")
        if not 1 <= top_n <= prompts.shape[0]:
            raise ValueError(f"top_n {top_n} outside 1..{prompts.shape[0]}")
        self.prompts = nn.Parameter(prompts.clone())
        self.keys = nn.Parameter(keys.clone())
        self.top_n = top_n

    def similarity(self, query_Bd: torch.Tensor) -> torch.Tensor:
        """cos(query, key_m) for every key: (B, M)."""
        return F.normalize(query_Bd.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T

    def forward(self, query_Bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt (B, N*L, d), pull term (scalar), selected indices (B, N)).

        Called as a module, so that ZeRO-3 gathers prompts and keys.
        """
        cos_BM = self.similarity(query_Bd)
        selected_BN = cos_BM.topk(self.top_n, dim=-1).indices
        pull = (1.0 - cos_BM.gather(1, selected_BN)).sum(dim=1).mean()
        prompt_BNLd = self.prompts[selected_BN]
        return prompt_BNLd.flatten(1, 2), pull, selected_BN


@dataclass
class L2POutput:
    loss: torch.Tensor  # the LM loss with the selected prompts in front
    pull: torch.Tensor  # mean over the batch of sum over selected keys of (1 - cos)
    selected: torch.Tensor  # (B, N) the prompts each input picked


class L2PModel(nn.Module):
    """A frozen backbone, its prompt-free query, and the L2P pool in front of every input."""

    def __init__(self, backbone: nn.Module, pool: L2PPool, *, is_encoder_decoder: bool):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.is_encoder_decoder = is_encoder_decoder

    @torch.no_grad()
    def query(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        """(B, d): the frozen backbone's feature of the prompt alone, with dropout off as at test time,
        so that an input selects the same prompts in training and at test."""
        training = self.backbone.training
        self.backbone.eval()
        try:
            return mean_pooled_hidden(self.backbone, input_ids, attention_mask, labels,
                                      is_encoder_decoder=self.is_encoder_decoder)
        finally:
            self.backbone.train(training)

    def select(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        """(B, N): the prompts each input picks."""
        return self.pool(self.query(input_ids, attention_mask, labels))[2]

    def forward(self, input_ids, attention_mask, labels=None) -> L2POutput:
        prompt, pull, selected = self.pool(self.query(input_ids, attention_mask, labels))
        out = self.backbone(**prompted_inputs(self.backbone, input_ids, attention_mask, prompt, labels,
                                              is_encoder_decoder=self.is_encoder_decoder))
        return L2POutput(loss=out.loss, pull=pull, selected=selected)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        prompt, _, _ = self.pool(self.query(input_ids, attention_mask))
        return generate_prompted(self.backbone, input_ids, attention_mask, prompt,
                                 is_encoder_decoder=self.is_encoder_decoder, **kwargs)
