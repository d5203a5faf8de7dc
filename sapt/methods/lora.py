"""Plain LoRA baselines on PEFT: sequential (SeqLoRA), single-task, and the multi-task upper bound."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from sapt.backbones.types import Backbone
from sapt.methods.base import Method, Stage

ADAPTER_DIR = "adapter"


def new_lora(backbone: Backbone, pet) -> nn.Module:
    """Wraps the frozen backbone with one fresh LoRA block on its query/value projections."""
    config = LoraConfig(
        r=pet.lora_r,
        lora_alpha=pet.lora_alpha,
        lora_dropout=pet.lora_dropout,
        target_modules=backbone.lora_targets,
        task_type=TaskType.SEQ_2_SEQ_LM if backbone.is_encoder_decoder else TaskType.CAUSAL_LM,
    )
    return get_peft_model(backbone.model, config)


class _LoraMethod(Method):
    """One PEFT LoRA adapter, saved as a standard adapter folder after each stage."""

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        if state_dir is None or stage.fresh:
            return new_lora(backbone, self.pet)
        return PeftModel.from_pretrained(backbone.model, state_dir / ADAPTER_DIR, is_trainable=True)

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir / ADAPTER_DIR)


class SeqLora(_LoraMethod):
    """SeqLoRA: one LoRA block trained on every task in turn (forgets; the lower bound)."""

    name = "seq-lora"


class SingleLora(_LoraMethod):
    """A fresh LoRA per task, scored on its own task only: the reference FWT is measured against."""

    name = "single"

    def stages(self, num_tasks: int) -> list[Stage]:
        return [Stage(row=j, train_tasks=(j,), eval_tasks=(j,), fresh=True) for j in range(num_tasks)]


class MultiTaskLora(_LoraMethod):
    """All tasks' data at once in one LoRA: the upper bound. Fills only the last matrix row."""

    name = "multitask"

    def stages(self, num_tasks: int) -> list[Stage]:
        every = tuple(range(num_tasks))
        return [Stage(row=num_tasks - 1, train_tasks=every, eval_tasks=every, fresh=True)]
