"""A pool of soft prompts mixed per input: P(x) = sum_j alpha_j(x) P_j, prepended to the input.

One einsum whatever the pool size. Old prompts are a frozen buffer, the newest is the parameter.
Shapes: B batch, n blocks, P prompt length, d embedding size.
"""

from __future__ import annotations

import torch
from torch import nn

from sapt.pet.soft_prompt import vocabulary_rows


class PromptPool(nn.Module):
    """Soft prompts of ``length`` vectors, the new one initialised from sampled vocabulary embeddings.

    Args:
        embedding: the backbone's (frozen) input embedding matrix, (vocab, d).
        length: prompt length (SAPT-Prompt: 10).
        old_blocks: how many frozen prompts precede the new one.
        generator: seeds the vocabulary sample.
    """

    def __init__(self, embedding: torch.Tensor, length: int, old_blocks: int, generator: torch.Generator):
        super().__init__()
        dim = embedding.shape[1]
        self.length = length
        self.register_buffer("old_prompts", torch.zeros(old_blocks, length, dim, dtype=embedding.dtype,
                                                        device=embedding.device))
        self.prompt = nn.Parameter(vocabulary_rows(embedding, length, generator))  # (P, d)

    @property
    def num_blocks(self) -> int:
        return self.old_prompts.shape[0] + 1

    def prompts(self) -> torch.Tensor:
        """All prompts, oldest first: (n, P, d)."""
        return torch.cat([self.old_prompts.to(self.prompt.dtype), self.prompt.unsqueeze(0)], dim=0)

    def forward(self, weights_Bn: torch.Tensor) -> torch.Tensor:
        """The per-input mixed prompt: (B, P, d)."""
        return torch.einsum("bn,npd->bpd", weights_Bn.to(self.prompt.dtype), self.prompts())

    @torch.no_grad()
    def load_old_blocks(self, prompts: torch.Tensor) -> None:
        """Fills the frozen prompts, (n-1, P, d), oldest first."""
        if prompts.shape != self.old_prompts.shape:
            raise ValueError(f"expected old prompts of shape {tuple(self.old_prompts.shape)}, got {tuple(prompts.shape)}")
        self.old_prompts.copy_(prompts)
