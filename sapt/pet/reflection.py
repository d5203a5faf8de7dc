"""ARM's loss: pull the router's attention on an old task's inputs back to that task's stored mean.

Blocks are chronological here (block 0 = task 1). The target of task i at a pool of n blocks is
its stored mean attention over blocks 0..i followed by zeros at every newer block, the one being
trained included; the authors' reverse-chronological layout puts the same zeros in front
(sapt-method.md 2.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_target(stored: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A stored mean attention (length i+1 for task i) zero-padded to ``num_blocks``."""
    if stored.shape[-1] > num_blocks:
        raise ValueError(f"a target over {stored.shape[-1]} blocks cannot fit a pool of {num_blocks}")
    return F.pad(stored, (0, num_blocks - stored.shape[-1]))


def reflection_kl(log_weights_Bn: torch.Tensor, target_n: torch.Tensor) -> torch.Tensor:
    """KL(target || current), averaged over the batch; zero-target terms contribute nothing."""
    target_Bn = target_n.to(log_weights_Bn).expand_as(log_weights_Bn)
    return F.kl_div(log_weights_Bn, target_Bn, reduction="batchmean")
