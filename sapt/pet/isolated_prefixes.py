"""One prefix (past keys and values in every layer, P-tuning v2) per task on a frozen backbone, and at
test time the one prefix of the task each input is identified as (EPI, Wang et al., ACL 2023).

The prefixes are PEFT prefix-tuning adapters, ``block-000`` ... ``block-NNN``, one per task: PEFT
builds the past key/values for training and for ``generate``. Training runs the newest adapter on
the new task's items. At test, the frozen, prefix-free backbone's mean-pooled feature picks a task
(``TaskGaussians``); PEFT runs one adapter for a whole batch, so the batch is split by picked task
and each group generates with its own prefix. Under ZeRO-3 every rank steps through every task
(with one stand-in row where it has none) so that the ranks' collective calls stay in step.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn
from torch.nn import functional as F

from sapt.pet.features import mean_pooled_hidden
from sapt.pet.task_gaussians import TaskGaussians


def adapter_name(index: int) -> str:
    return f"block-{index:03d}"


class IsolatedPrefixModel(nn.Module):
    """A PEFT model holding one prefix adapter per task so far, the newest active, and the selector.

    Args:
        peft_model: the PEFT model with adapters ``block-000`` .. ``block-{n-1}``; None for the
            statistics alone on the bare ``backbone`` (they identify tasks, nothing generates).
        gaussians: the finished tasks' statistics (fewer tasks than adapters while the newest trains).
        is_encoder_decoder: T5 style (True) or decoder-only (False).
    """

    def __init__(self, peft_model: PeftModel | None, gaussians: TaskGaussians, *, num_blocks: int,
                 is_encoder_decoder: bool, backbone: nn.Module | None = None):
        super().__init__()
        if (peft_model is None) == (backbone is None):
            raise ValueError("give the PEFT model, or the bare backbone for the statistics alone")
        self.peft = peft_model
        self.bare = backbone
        self.gaussians = gaussians
        self.num_blocks = num_blocks
        self.is_encoder_decoder = is_encoder_decoder

    @property
    def newest(self) -> str:
        return adapter_name(self.num_blocks - 1)

    def forward(self, input_ids, attention_mask, labels=None):
        """Training: the newest prefix on every item (they are all the new task's)."""
        return self.peft(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def features(self, input_ids, attention_mask, labels=None) -> torch.Tensor:
        """(B, d): the frozen backbone's mean-pooled feature of each input, with no prefix and dropout off."""
        backbone = self.peft.get_base_model() if self.peft is not None else self.bare
        training = backbone.training
        backbone.eval()
        try:
            return mean_pooled_hidden(backbone, input_ids, attention_mask, labels,
                                      is_encoder_decoder=self.is_encoder_decoder)
        finally:
            backbone.train(training)

    @torch.no_grad()
    def select(self, input_ids, attention_mask) -> torch.Tensor:
        """(B,): the task each input is identified as."""
        return self.gaussians.select(self.features(input_ids, attention_mask))

    @torch.no_grad()
    def block_weights(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, n): one-hot on the picked task's prefix."""
        return F.one_hot(self.select(input_ids, attention_mask), self.num_blocks).float()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, synced_gpus: bool = False, **kwargs) -> torch.Tensor:
        """Each input generates with its own task's prefix only; outputs padded to one width."""
        picked = self.select(input_ids, attention_mask)
        pad = kwargs.get("pad_token_id")
        pad = 0 if pad is None else pad
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for task in range(self.gaussians.num_tasks):
                rows = (picked == task).nonzero().squeeze(1)
                if not len(rows) and not synced_gpus:
                    continue
                self.peft.set_adapter(adapter_name(task))
                run = rows if len(rows) else rows.new_zeros(1)  # a stand-in row keeps ZeRO-3 ranks in step
                out = self.peft.generate(input_ids=input_ids[run], attention_mask=attention_mask[run],
                                         synced_gpus=synced_gpus, **kwargs)
                if len(rows):
                    outputs.append((rows, out))
        finally:
            self.peft.set_adapter(self.newest)
        width = max(out.shape[1] for _, out in outputs)
        merged = input_ids.new_full((input_ids.shape[0], width), pad)
        for rows, out in outputs:
            merged[rows, : out.shape[1]] = out
        return merged
