"""DeepSpeed engine set-up for a PET model: config dict, client optimizer, no JIT-compiled ops.

The caller picks the accelerator (``DS_ACCELERATOR``) before this module is imported.
"""

from __future__ import annotations

import deepspeed
import torch
from torch import nn


def deepspeed_config(train, *, use_bf16: bool) -> dict:
    """The DeepSpeed JSON config for one task's training, from the run's ``train`` section."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": use_bf16},
        # A torch optimizer is passed in: DeepSpeed's fused Adam would JIT-compile a C++ op first.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, train, *, use_bf16: bool, param_groups: list[dict] | None = None):
    """Wraps ``model`` in a DeepSpeed engine that optimizes only its trainable parameters.

    Args:
        param_groups: optimizer groups ({"params", "lr"}) when parts of the model need their own
            learning rate; default one group at ``train.lr``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the method left no trainable parameters")
    optimizer = torch.optim.AdamW(param_groups or trainable, lr=train.lr, weight_decay=train.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train, use_bf16=use_bf16)
    )
    return engine
