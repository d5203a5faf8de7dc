"""The contract between the runner and a continual-learning method.

The runner owns the loop (data, engines, evaluation, logging); a method only says which data each
stage trains on, how its model is built from the previous stage's saved state, what the loss is,
and what to save. Methods never touch Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from sapt.backbones.types import Backbone


class NoArgs(BaseModel):
    """For methods without knobs of their own: any ``method_args`` key is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Stage:
    """One training run of the sequence and the evaluation after it.

    Attributes:
        row: the accuracy-matrix row this stage fills (the index of the last task trained).
        train_tasks: indices into the order whose training data this stage uses.
        eval_tasks: indices whose test split is scored after this stage.
        fresh: start from the bare backbone instead of the previous stage's saved state.
    """

    row: int
    train_tasks: tuple[int, ...]
    eval_tasks: tuple[int, ...]
    fresh: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage":
        return cls(
            row=data["row"],
            train_tasks=tuple(data["train_tasks"]),
            eval_tasks=tuple(data["eval_tasks"]),
            fresh=data["fresh"],
        )


@dataclass(frozen=True)
class MemorySpec:
    """What a method keeps of each finished task for later stages.

    Attributes:
        source: ``real`` samples of the task's training split, or ``pseudo`` inputs produced by a
            generator trained on it (then the method also says how, in ``generator_settings``).
        use: ``replay`` mixes the items (with answers) into later tasks' training data; ``reflect``
            hands their inputs to ``Method.loss`` as ``reflect`` batches, one per earlier task.
        fraction: share of the task's training set kept (at least one item).
    """

    source: Literal["real", "pseudo"]
    use: Literal["replay", "reflect"]
    fraction: float = 0.02

    def count(self, train_size: int) -> int:
        """How many items are kept of a task with ``train_size`` training items."""
        return max(1, int(self.fraction * train_size))


@dataclass(frozen=True)
class GeneratorSettings:
    """How the pseudo-sample generator of one task is trained and sampled (sapt-method.md 2.1)."""

    steps: int
    lr: float
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int


class Method(ABC):
    """A continual-learning method: subclass, set ``name`` (and ``Config``), add it to METHODS.

    Args:
        args: the validated ``method_args`` (an instance of ``Config``).
        pet: the run's ``pet`` section (LoRA rank, alpha, dropout).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoArgs

    def __init__(self, args: BaseModel, pet: Any):
        self.args = args
        self.pet = pet

    def stages(self, num_tasks: int) -> list[Stage]:
        """Sequential by default: stage j trains task j, then scores tasks 0..j."""
        return [Stage(row=j, train_tasks=(j,), eval_tasks=tuple(range(j + 1))) for j in range(num_tasks)]

    @abstractmethod
    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        """Returns the model to train at ``stage``: the backbone plus PET parameters.

        ``state_dir`` holds what ``save`` wrote at the previous stage (None at the first stage or
        when ``stage.fresh``). Only the parameters to train may have ``requires_grad=True``.
        """

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        reflect: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one micro-batch and any extra terms to log.

        Args:
            reflect: for ``memory().use == "reflect"``: one batch of remembered inputs
                (input_ids, attention_mask) per earlier task index.
        """
        return model(**batch).loss, {}

    def param_groups(self, model: nn.Module, lr: float) -> list[dict] | None:
        """Optimizer groups when parts of the model need their own learning rate; None: one group."""
        return None

    def memory(self) -> MemorySpec | None:
        """What to keep of each finished task; None keeps nothing."""
        return None

    def generator_settings(self) -> GeneratorSettings | None:
        """For ``memory().source == "pseudo"``: how to train and sample each task's generator."""
        return None

    def attention(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-input weights over the PET blocks used at test time, (B, blocks); None if the method
        has no routing. Feeds the diagnostics (routing accuracy, attention heatmaps)."""
        return None

    def remember(self, model: nn.Module, task: int, mean_attention: torch.Tensor) -> None:
        """After a task: its validation inputs' mean ``attention``, to keep in the saved state."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Writes what the next stage (and the registry) needs: safetensors and JSON only."""
