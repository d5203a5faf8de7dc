"""The shared attention router: one weight per PET block for every input, with no task id.

query  = projection(max-pool over the input's raw token embeddings)      (B, d)
logits = query . key_j / temperature, for the blocks j that exist          (B, n)
alpha  = softmax(logits)                                                  (B, n)

Keys are held chronologically: key 0 belongs to the first task. Old keys are frozen buffers; the
newest key and the projection are the trainable parameters (sapt-method.md 1.2, 1.6). Shapes:
B batch, L sequence length, d embedding size, n blocks.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


def max_pool_embeddings(embeddings_BLd: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
    """Element-wise max over the sequence.

    Args:
        embeddings_BLd: raw token embeddings.
        mask_BL: 1 where a real token sits; None pools over every position, padding included
            (the authors' code, whose query then depends on how much padding a batch has).
    """
    if mask_BL is None:
        return embeddings_BLd.max(dim=1).values
    floor = torch.finfo(embeddings_BLd.dtype).min
    hidden = embeddings_BLd.masked_fill(~mask_BL.bool().unsqueeze(-1), floor)
    return hidden.max(dim=1).values


class QueryProjection(nn.Sequential):
    """The trainable map from a pooled embedding to a query.

    ``layout="code"`` is what the authors ran: Linear(d->h) -> Linear(h->d) -> SiLU -> LayerNorm,
    with no nonlinearity between the two linears. ``layout="paper"`` is what the paper (and ATTEMPT)
    describes: Linear(d->h) -> SiLU -> Linear(h->d) -> LayerNorm.
    """

    def __init__(self, dim: int, hidden: int, layout: Literal["code", "paper"] = "code"):
        down, up = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
        layers = [down, up, nn.SiLU()] if layout == "code" else [down, nn.SiLU(), up]
        super().__init__(*layers, nn.LayerNorm(dim))


class SharedAttention(nn.Module):
    """Projection + keys: per-input weights over the blocks of a pool.

    Args:
        dim: the backbone's embedding size d.
        hidden: the projection's bottleneck h (SAPT: 100).
        temperature: divides the logits; None means sqrt(d) (what every released script ran).
        layout: see ``QueryProjection``.
        masked_pooling: pool over real tokens only (True) or over padding too (the authors' code).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 100,
        temperature: float | None = None,
        layout: Literal["code", "paper"] = "code",
        masked_pooling: bool = True,
    ):
        super().__init__()
        self.dim, self.hidden, self.layout, self.masked_pooling = dim, hidden, layout, masked_pooling
        self.temperature = float(temperature) if temperature else math.sqrt(dim)
        self.projection = QueryProjection(dim, hidden, layout)
        self.register_buffer("old_keys", torch.zeros(0, dim))  # (n-1, d), frozen
        # Subtracted from every pooled embedding before the projection; zero (the authors') unless a
        # method sets it: the pooled embeddings of all tasks share most of their direction.
        self.register_buffer("center", torch.zeros(dim))
        self.new_key = nn.Parameter(torch.empty(1, dim).uniform_(-1.0, 1.0))  # uniform(-1, 1) as in SAPT

    @property
    def num_blocks(self) -> int:
        return self.old_keys.shape[0] + 1

    def keys(self) -> torch.Tensor:
        """All keys, oldest first: (n, d)."""
        return torch.cat([self.old_keys.to(self.new_key.dtype), self.new_key], dim=0)

    def forward(self, embeddings_BLd: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
        """The logits over the blocks, (B, n); softmax gives the attention weights alpha.

        Called as a module (never as a plain method) so that ZeRO-3 gathers the key and projection.
        """
        return self.query(embeddings_BLd, mask_BL) @ self.keys().T / self.temperature  # (B, n)

    def query(self, embeddings_BLd: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
        """The projected query of each input, (B, d)."""
        pooled_Bd = self.pooled(embeddings_BLd, mask_BL)
        return self.projection((pooled_Bd - self.center.to(pooled_Bd.dtype)).to(self.new_key.dtype))

    def pooled(self, embeddings_BLd: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
        """What the query is projected from, before centering: (B, d)."""
        return max_pool_embeddings(embeddings_BLd, mask_BL if self.masked_pooling else None)

    @torch.no_grad()
    def aim_new_key(self, direction_d: torch.Tensor) -> None:
        """Points the new key along ``direction_d``, at the length a uniform(-1, 1) key has on
        average (sqrt(d / 3)): where the new block's inputs lie, at the scale the authors' keys have."""
        length = math.sqrt(self.dim / 3)
        self.new_key.copy_((direction_d / direction_d.norm().clamp_min(1e-12) * length).reshape(1, -1))

    def describe(self) -> dict:
        """The JSON that, with the state dict, rebuilds this router."""
        return {
            "dim": self.dim,
            "hidden": self.hidden,
            "temperature": self.temperature,
            "layout": self.layout,
            "masked_pooling": self.masked_pooling,
            "num_blocks": self.num_blocks,
        }
