"""Plain LoRA baselines on PEFT: sequential (SeqLoRA), Replay, single-task, and the multi-task upper bound.

One PEFT adapter, saved as a standard adapter folder after each stage; the registry stores it as
the state's shared part (no task-owned blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import MemorySpec, Method, Stage, StateFiles

ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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


def check_adapter(folder: Path) -> None:
    """Raises SaptError when ``folder`` is not a PEFT adapter folder of safetensors + JSON."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise SaptError("not a PEFT adapter folder", source=str(folder / name))


def sort_target_modules(config_file: Path) -> None:
    """PEFT keeps target_modules as a set, written in hash order: sort it, so the same adapter always
    gives the same bytes (the registry recognises a registered state by its sha256)."""
    saved = json.loads(config_file.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))


class _LoraMethod(Method):
    """One PEFT LoRA adapter, saved as a standard adapter folder after each stage."""

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        if state_dir is None or stage.fresh:
            return new_lora(backbone, self.pet)
        check_adapter(state_dir / ADAPTER_DIR)
        return PeftModel.from_pretrained(backbone.model, state_dir / ADAPTER_DIR, is_trainable=True)

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir / ADAPTER_DIR)
        sort_target_modules(out_dir / ADAPTER_DIR / ADAPTER_FILES[0])

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        check_adapter(state_dir / ADAPTER_DIR)
        return StateFiles(blocks=(), shared=tuple(f"{ADAPTER_DIR}/{name}" for name in ADAPTER_FILES))

    def load_finished(self, backbone: Backbone, state_dir: Path) -> nn.Module:
        check_adapter(state_dir / ADAPTER_DIR)
        try:
            model = PeftModel.from_pretrained(backbone.model, state_dir / ADAPTER_DIR)
        except Exception as err:  # PEFT reports shape mismatches as RuntimeError
            raise SaptError(f"adapter does not fit the backbone: {err}", source=str(state_dir / ADAPTER_DIR)) from None
        return model.eval()


class SeqLora(_LoraMethod):
    """SeqLoRA: one LoRA block trained on every task in turn (forgets; the lower bound)."""

    name = "seq-lora"


class ReplayArgs(BaseModel):
    """``method_args`` of replay (SAPT paper, Appendix C: 2% of each old task)."""

    model_config = ConfigDict(extra="forbid")
    memory_fraction: float = Field(0.02, gt=0, le=1, description="Share of each finished task's training items kept.")


class Replay(_LoraMethod):
    """Replay: SeqLoRA plus an episodic buffer of real items.

    After each task a uniformly random ``memory_fraction`` of its training items (input and answer)
    is kept; every later task trains on its own data with the buffer concatenated and shuffled in
    (the first of the two readings in baselines.md 3; the ProgPrompt-style interleaving is not
    implemented), with the plain LM loss. Stores real data.
    """

    name = "replay"
    Config = ReplayArgs

    def memory(self) -> MemorySpec:
        return MemorySpec(source="real", use="replay", fraction=self.args.memory_fraction)


class SingleLora(_LoraMethod):
    """A fresh LoRA per task, scored on its own task only: the reference FWT is measured against."""

    name = "single"

    def stages(self, num_tasks: int) -> list[Stage]:
        return [Stage(row=j, train_tasks=(j,), eval_tasks=(j,), fresh=True, reference=True) for j in range(num_tasks)]


class MultiTaskLora(_LoraMethod):
    """All tasks' data at once in one LoRA: the upper bound. Fills only the last matrix row."""

    name = "multitask"

    def stages(self, num_tasks: int) -> list[Stage]:
        every = tuple(range(num_tasks))
        return [Stage(row=num_tasks - 1, train_tasks=every, eval_tasks=every, fresh=True)]
