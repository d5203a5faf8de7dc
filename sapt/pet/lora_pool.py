"""A pool of LoRA blocks on one linear layer, mixed per input by routing weights.

    h = W x + sum_j alpha_j(x) * s * B_j A_j x          (s = lora_alpha / r)

Every block's A is stacked along the rank axis (A_all: (n*r, d_in)) and every B likewise
(B_all: (d_out, n*r)), so the mix is one scaled low-rank product whatever the pool size:
    h = W x + B_all diag(s * repeat(alpha, r)) A_all x
Old blocks are buffers (no gradient, never updated); the newest block is the only parameter.
Shapes: B batch, R = n*r stacked rank, n blocks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class Routing:
    """The per-input block weights of the current forward pass, shared by every pooled layer.

    The model wrapper sets ``weights`` (B, n) before it calls the backbone; one vector per input,
    the same for every layer and every adapted projection (sapt-method.md 1.3).
    """

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None
        # When a list: each pooled layer appends its OverlapTerms during forward. Computed there
        # because ZeRO-3 gathers a layer's parameters only while its own forward runs.
        self.overlaps: list[OverlapTerms] | None = None


class OverlapTerms(NamedTuple):
    """One pooled layer's new block against its frozen ones (O-LoRA's two penalties).

    Attributes:
        overlap: sum |A_old A_new^T| over every old row and new row (0 without old blocks).
        norm: ||A_new||_2 + ||B_new||_2 (Frobenius norms, not squared).
    """

    overlap: torch.Tensor
    norm: torch.Tensor


class _PooledDelta(torch.autograd.Function):
    """((x A_all^T) * scale) B_all^T with gradients for x, scale and the new block only.

    Autograd through the torch.cat of frozen and new blocks would also form the frozen blocks'
    weight gradients ((R, d_in) and (d_out, R)) and discard them: 2 of the 6 rank-R matmuls of a
    pooled layer per step. This backward skips them and saves one (B, ..., R) activation, not two.
    """

    @staticmethod
    def forward(ctx, x, scale, old_A, old_B, new_A, new_B):
        a_all = torch.cat([old_A, new_A], dim=0)  # (R, d_in)
        b_all = torch.cat([old_B, new_B], dim=1)  # (d_out, R)
        low = x @ a_all.T  # (B, ..., R)
        ctx.rank = new_A.shape[0]
        ctx.save_for_backward(x, scale, a_all, b_all, low)
        return (low * scale) @ b_all.T

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, a_all, b_all, low = ctx.saved_tensors
        need_x, need_scale, _, _, need_A, need_B = ctx.needs_input_grad
        new = slice(a_all.shape[0] - ctx.rank, None)
        grad_scaled = grad_out @ b_all  # (B, ..., R): gradient of low * scale
        grad_low = grad_scaled * scale
        grad_x = grad_low @ a_all if need_x else None
        grad_scale = None
        if need_scale:
            token_dims = tuple(range(1, low.dim() - 1))
            grad_scale = (grad_scaled * low).sum(token_dims, keepdim=True) if token_dims else grad_scaled * low
        grad_A = grad_low[..., new].flatten(0, -2).T @ x.flatten(0, -2) if need_A else None  # (r, d_in)
        grad_B = None
        if need_B:
            grad_B = grad_out.flatten(0, -2).T @ (low[..., new] * scale[..., new]).flatten(0, -2)  # (d_out, r)
        return grad_x, grad_scale, None, None, grad_A, grad_B


class PooledLoraLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with a pool of LoRA blocks.

    Args:
        base: the frozen linear layer.
        routing: where the per-input weights are read from.
        rank, alpha, dropout: LoRA rank r, scale numerator, dropout on the layer input.
        old_blocks: how many frozen blocks precede the new one (their weights are loaded later).
        new_blocks: trainable blocks after the frozen ones, stacked in one parameter (ConPET's new
            expert and its selector are two).
    """

    def __init__(self, base: nn.Linear, routing: Routing, *, rank: int, alpha: float, dropout: float,
                 old_blocks: int, new_blocks: int = 1):
        super().__init__()
        self.base = base
        self.routing = routing
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("old_A", torch.zeros(old_blocks * rank, base.in_features, dtype=dtype, device=device))
        self.register_buffer("old_B", torch.zeros(base.out_features, old_blocks * rank, dtype=dtype, device=device))
        # PEFT's LoRA initialisation, done here (outside any HF from_pretrained) so it really runs.
        self.new_blocks = new_blocks
        self.lora_A = nn.Parameter(torch.empty(new_blocks * rank, base.in_features, dtype=dtype, device=device))
        for block in self.lora_A.data.split(rank):  # each block's own fan-in, as PEFT initialises one
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, new_blocks * rank, dtype=dtype, device=device))

    @property
    def num_blocks(self) -> int:
        return (self.old_A.shape[0] + self.lora_A.shape[0]) // self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights_Bn = self.routing.weights
        if weights_Bn is None:
            raise RuntimeError("no routing weights set: call the pool through its RoutedModel")
        out = self.base(x)
        scale_BR = weights_Bn.to(x.dtype).repeat_interleave(self.rank, dim=1) * self.scaling
        scale = scale_BR.view(scale_BR.shape[0], *([1] * (x.dim() - 2)), scale_BR.shape[1])
        if self.routing.overlaps is not None:
            self.routing.overlaps.append(OverlapTerms(
                overlap=(self.old_A @ self.lora_A.T).abs().sum(),  # (R_old, r)
                norm=torch.linalg.norm(self.lora_A) + torch.linalg.norm(self.lora_B),
            ))
        return out + _PooledDelta.apply(self.dropout(x), scale, self.old_A, self.old_B, self.lora_A, self.lora_B)

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index`` (0 = oldest, the last ``new_blocks`` trainable) as (A (r, d_in), B (d_out, r))."""
        old = self.old_A.shape[0] // self.rank
        if index >= old:
            rows = slice((index - old) * self.rank, (index - old + 1) * self.rank)
            return self.lora_A.detach()[rows], self.lora_B.detach()[:, rows]
        rows = slice(index * self.rank, (index + 1) * self.rank)
        return self.old_A[rows], self.old_B[:, rows]

    @torch.no_grad()
    def load_old_blocks(self, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fills the frozen part of the pool with (A, B) pairs, oldest first."""
        if len(blocks) != self.num_blocks - self.new_blocks:
            raise ValueError(f"expected {self.num_blocks - self.new_blocks} old blocks, got {len(blocks)}")
        if blocks:
            self.old_A.copy_(torch.cat([a for a, _ in blocks], dim=0))
            self.old_B.copy_(torch.cat([b for _, b in blocks], dim=1))


def targets_in(model: nn.Module, suffixes: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose name is a suffix or ends in ``.suffix`` (PEFT's rule)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
    ]


def inject_lora_pool(model: nn.Module, suffixes: list[str], routing: Routing, *, rank: int, alpha: float,
                     dropout: float, old_blocks: int, new_blocks: int = 1) -> dict[str, PooledLoraLinear]:
    """Replaces every targeted linear of ``model`` in place by a pooled layer; returns them by name."""
    names = targets_in(model, suffixes)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {suffixes}")
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = PooledLoraLinear(getattr(parent, child), routing, rank=rank, alpha=alpha, dropout=dropout,
                                 old_blocks=old_blocks, new_blocks=new_blocks)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers
