"""DeepSpeed engine set-up for a PET model: config dict, client optimizer, no JIT-compiled ops; gathering
ZeRO-3 partitioned parameters to save them.

The caller picks the accelerator (``DS_ACCELERATOR``) before this module is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    _skip_shm_comm_op()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train, use_bf16=use_bf16)
    )
    return engine


def _skip_shm_comm_op() -> None:
    """On the CPU accelerator DeepSpeed's communication backend JIT-compiles its shared-memory
    all-reduce op (C++, into ~/.cache/torch_extensions: about 90 s on 2 cores, again for every
    environment at a new path, and a build killed midway leaves a lock that hangs later runs). Only
    DeepSpeed-inference's all-reduce uses that op; training's collectives go through
    torch.distributed (gloo). Marking the op incompatible in DeepSpeed's compatibility table, which
    the backend consults and deepspeed.ops keeps for the process, skips the build."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


@contextlib.contextmanager
def whole_trainable(engine, zero_stage: int) -> Iterator[None]:
    """Holds the engine's trainable parameters whole for the duration, e.g. to save them.

    Under ZeRO-3 parameters are partitioned across ranks: gather the trainable ones (every rank must
    enter); other stages keep them whole already.

    Args:
        engine: a DeepSpeed engine from ``build_engine``.
        zero_stage: the run's ``train.zero_stage``.
    """
    if zero_stage != 3:
        yield
        return
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        yield
