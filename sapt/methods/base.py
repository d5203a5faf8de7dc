"""The contract between the runner and a continual-learning method.

The runner owns the loop (data, engines, evaluation, logging, registry); a method says which data
each stage trains on, how its model is built from the previous stage's saved state, what the loss
is, what it keeps of a finished task, what to save and how to rebuild its finished model. Methods
never touch Ray, DeepSpeed or MLflow: the workers and the registry do those parts for every method.

A new method is one module (or folder) here, one row in ``METHODS`` (``__init__.py``) and, where
useful, a preset and a search space under ``tuning/``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from sapt.backbones.types import Backbone

# Keys the workers add to every training batch beside the model inputs (``Method.loss`` sees them).
TASK_KEY = "task"  # (B,) long: the item's task index in the order
MEMORY_KEY = "memory"  # (B,) bool: True for a remembered item of an earlier task (replay)
META_KEYS = (TASK_KEY, MEMORY_KEY)


def read_state_file(path: Path, method: str, count_key: str) -> dict:
    """A method's state JSON (``{"method": ..., count_key: int, ...}``), checked to be ``method``'s.

    Raises:
        SaptError: the file is missing or belongs to another method.
    """
    from sapt.errors import SaptError

    if not path.is_file():
        raise SaptError(f"not a {method} state folder", source=str(path))
    state = json.loads(path.read_text())
    if state.get("method") != method or not isinstance(state.get(count_key), int):
        raise SaptError(f"state of method {state.get('method')!r}, not {method!r}", source=str(path), field="method")
    return state


def check_finished_count(path: Path, count: int, task_index: int, noun: str, field: str) -> None:
    """A state saved after task ``task_index`` (0-based) holds one ``noun`` per finished task.

    Raises:
        SaptError: ``count`` is not ``task_index + 1`` (field ``field`` of the state file).
    """
    from sapt.errors import SaptError

    if count != task_index + 1:
        raise SaptError(f"{count} {noun}, but task {task_index} (0-based) needs {task_index + 1}", source=str(path),
                        field=field)


def frozen_for_inference(model: nn.Module) -> nn.Module:
    """Nothing trainable, eval mode: what ``load_finished`` returns."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the worker's bookkeeping keys: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in META_KEYS}


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
        reference: a single-task reference: its score on task ``row`` is what FWT compares against.
    """

    row: int
    train_tasks: tuple[int, ...]
    eval_tasks: tuple[int, ...]
    fresh: bool = False
    reference: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage":
        return cls(
            row=data["row"],
            train_tasks=tuple(data["train_tasks"]),
            eval_tasks=tuple(data["eval_tasks"]),
            fresh=data["fresh"],
            reference=data.get("reference", False),
        )


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know of each task of the order before training (``Method.set_tasks``).

    Attributes:
        name: the task's name.
        kind: ``classification`` (exact match) or ``generation`` (Rouge-L).
        labels: the task's label set, where it has one (Long Sequence's labels.json, the embedded
            tasks' words); None for open answers.
    """

    name: str
    kind: str
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "labels": None if self.labels is None else list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskInfo:
        labels = data.get("labels")
        return cls(name=data["name"], kind=data["kind"], labels=None if labels is None else tuple(labels))


def task_infos(tasks) -> list[TaskInfo]:
    """The ``TaskInfo`` of each loaded task (``sapt.data.types.TaskData``)."""
    return [TaskInfo(name=t.name, kind=t.kind, labels=t.labels) for t in tasks]


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
    # Training stops early once a window's mean loss is less than min_improvement below the best
    # window before it (sapt.train.plateau); min_improvement 0 runs all ``steps``.
    stop_window: int = 25
    min_improvement: float = 0.0
    # "real": each prompt is sampled to a length drawn from the task's own prompts (capped at
    # max_new_tokens) instead of ending where the generator puts its end token.
    lengths: str = "free"


@dataclass(frozen=True)
class SampleSettings:
    """How a method's own finished model samples pseudo items (``MemorySpec.source == "self"``)."""

    top_k: int
    max_new_tokens: int


@dataclass(frozen=True)
class MemorySpec:
    """What a method keeps of each finished task for later stages, and how they use it.

    Attributes:
        source: ``real`` items of the task's training split, ``pseudo`` inputs written by a
            generator that the workers train on the task (settings in ``generator``), or ``self``:
            items, answers included, that the method's own model writes (``Method.sample_memory``,
            settings in ``sampling``). Self-written memory is written again for every finished
            task from the newest state after each stage (LFPT5 samples its earlier tasks from the
            current prompt before every new task).
        use: ``replay`` mixes the items, with their answers, into later tasks' training stream
            (flagged ``memory`` in the batch); ``reflect`` hands their inputs only to
            ``Method.loss`` as ``reflect`` batches, one per earlier task per micro-batch.
        fraction: share of the task's training set kept (at least one item); 1.0 keeps it whole.
        per_task: keep this many items of each task instead (all of a smaller task); None: ``fraction``.
        generator: for ``source == "pseudo"``: how each task's generator is trained and sampled.
        sampling: for ``source == "self"``: how the method's model samples.
        mix: for ``replay``: ``shuffle`` concatenates the kept items into the stream and shuffles;
            ``balanced`` builds every batch from ``1 - old_share`` new items and ``old_share``
            remembered ones, drawing a uniformly chosen earlier task first, then one of its items
            (ConPET's dynamic replay, baselines.md 1.2).
        old_share: share of each ``balanced`` batch taken from memory.
        steps_per_epoch: for ``balanced``: a fixed number of batches per epoch whatever the number
            of earlier tasks (ConPET's step budget); None: one pass over the new task's items.
    """

    source: Literal["real", "pseudo", "self"]
    use: Literal["replay", "reflect"]
    fraction: float = 0.02
    per_task: int | None = None
    generator: GeneratorSettings | None = None
    sampling: SampleSettings | None = None
    mix: Literal["shuffle", "balanced"] = "shuffle"
    old_share: float = 0.5
    steps_per_epoch: int | None = None

    def __post_init__(self):
        if (self.source == "pseudo") != (self.generator is not None):
            raise ValueError("pseudo memory needs generator settings, the others none")
        if (self.source == "self") != (self.sampling is not None):
            raise ValueError("self-written memory needs sampling settings, the others none")
        if self.mix == "balanced" and self.use != "replay":
            raise ValueError("balanced batches mix replayed items")
        if self.steps_per_epoch is not None and self.mix != "balanced":
            raise ValueError("a fixed step budget belongs to balanced batches")

    @property
    def keeps_answers(self) -> bool:
        return self.use == "replay"

    def count(self, train_size: int) -> int:
        """How many items are kept of a task with ``train_size`` training items."""
        if self.per_task is not None:
            return min(self.per_task, train_size)
        return min(train_size, max(1, int(self.fraction * train_size)))


@dataclass(frozen=True)
class StateFiles:
    """The files of a finished state folder, as the registry stores them (paths relative to it).

    Attributes:
        blocks: one folder per task-owned PET block, oldest first (registered one version each);
            empty for methods whose parameters are shared by all tasks.
        shared: everything else the finished model needs (routers, selectors, statistics, a shared
            adapter, the method's JSON): files or folders.
    """

    blocks: tuple[str, ...]
    shared: tuple[str, ...]


class Method(ABC):
    """A continual-learning method: subclass, set ``name`` (and ``Config``), add it to METHODS.

    Args:
        args: the validated ``method_args`` (an instance of ``Config``).
        pet: the run's ``pet`` section (LoRA rank, alpha, dropout).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoArgs
    # Which inputs of a finished task ``post_task_sums`` reads (None: no post-task pass).
    post_task_split: ClassVar[Literal["val", "train"] | None] = None

    def __init__(self, args: BaseModel, pet: Any):
        self.args = args
        self.pet = pet
        self.tasks: list[TaskInfo] = []

    @property
    def start_task_pass(self) -> bool:
        """Whether ``start_task_sums``/``start_task`` run before a stage trains (on the new task's
        ``post_task_split`` inputs and the remembered inputs of earlier tasks); may depend on ``args``."""
        return False

    def set_tasks(self, tasks: list[TaskInfo]) -> None:
        """The order's tasks, before any stage: on the driver (where a refusal stops the run before
        anything starts) and on every worker.

        Raises:
            SaptError: this method cannot run on one of these tasks (field ``order``).
        """
        self.tasks = list(tasks)

    # -- the sequence --------------------------------------------------------------------------
    def stages(self, num_tasks: int) -> list[Stage]:
        """Sequential by default: stage j trains task j, then scores tasks 0..j."""
        return [Stage(row=j, train_tasks=(j,), eval_tasks=tuple(range(j + 1))) for j in range(num_tasks)]

    def memory(self) -> MemorySpec | None:
        """What to keep of each finished task; None keeps nothing."""
        return None

    def sample_memory(self, model: nn.Module, collator: Any, task: int, count: int, *, seed: int,
                      device: torch.device | str = "cpu") -> list[dict[str, str]]:
        """For ``memory().source == "self"``: up to ``count`` items of finished task ``task`` written by
        ``model`` (what ``load_finished`` returns), as ``{"source", "target"}``; samples that do not
        parse into input and output are left out."""
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------------
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
            batch: the model inputs plus ``task`` and ``memory`` (see ``META_KEYS``).
            reflect: for ``memory().use == "reflect"``: one batch of remembered inputs
                (input_ids, attention_mask) per earlier task index.
        """
        return model(**model_inputs(batch)).loss, {}

    def param_groups(self, model: nn.Module, lr: float) -> list[dict] | None:
        """Optimizer groups when parts of the model need their own learning rate; None: one group."""
        return None

    # -- before a task -------------------------------------------------------------------------
    def start_task_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For ``start_task_pass``: additive statistics of one batch of inputs (model inputs only),
        summed over batches and ranks like ``post_task_sums``."""
        raise NotImplementedError

    def start_task(self, model: nn.Module, new: dict[str, torch.Tensor], new_count: int,
                   old: dict[str, torch.Tensor], old_count: int) -> dict[str, Any] | None:
        """Adjusts the freshly built model before its optimizer exists (what it sets is what
        training starts from), given the summed statistics of the new task's ``post_task_split``
        inputs (``new``) and of every remembered input of earlier tasks (``old``; zero count when
        nothing is kept). Returns JSON diagnostics or None."""
        return None

    # -- after a task --------------------------------------------------------------------------
    def post_task_sums(self, model: nn.Module, batch: dict[str, torch.Tensor],
                       targets: list[str]) -> dict[str, torch.Tensor]:
        """For ``post_task_split``: additive statistics of one batch of the finished task's inputs.

        The workers run it over their share of the split, sum each tensor over batches and ranks
        (all-reduce), and hand the totals to ``finish_task``. Means, class statistics and
        covariances all come out of sums.
        """
        raise NotImplementedError

    def finish_task(self, model: nn.Module, task: int, sums: dict[str, torch.Tensor],
                    count: int) -> dict[str, Any] | None:
        """Takes the summed statistics of finished task ``task`` (``count`` inputs) into the state
        that ``save`` writes next. Returns JSON diagnostics (``train_attention``: the task's mean
        block weights) or None."""
        return None

    # -- routing diagnostics -------------------------------------------------------------------
    def attention(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-input weights over the PET blocks used at test time, (B, blocks); None if the method
        has no routing. Feeds routing accuracy, attention heatmaps and served ``block_weights``."""
        return None

    # -- state ---------------------------------------------------------------------------------
    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Writes what the next stage (and the registry) needs: safetensors and JSON only."""

    @abstractmethod
    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        """The files of the state saved after task ``task_index`` (0-based), for the registry.

        Raises:
            SaptError: the folder is not a finished state of this method after that task.
        """

    @abstractmethod
    def load_finished(self, backbone: Backbone, state_dir: Path) -> nn.Module:
        """The finished model for inference from a state folder: nothing trainable, eval mode.

        Raises:
            SaptError: the folder is not a finished state of this method, or does not fit the backbone.
        """

    def load_block(self, backbone: Backbone, block_dir: Path) -> nn.Module:
        """One task block alone on the bare backbone (a block version of the registry).
        Default: a PEFT adapter folder."""
        from sapt.errors import SaptError
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(backbone.model, str(block_dir)).eval()
        except Exception as err:  # PEFT reports shape mismatches as RuntimeError
            raise SaptError(f"block does not fit the backbone: {err}", source=str(block_dir)) from None

    def load_shared(self, backbone: Backbone, state_dir: Path, blocks: int) -> nn.Module:
        """What the shared state answers alone (a state version of the registry), for methods whose
        shared state routes inputs: a model with ``attention``-compatible ``block_weights``.

        Raises:
            SaptError: this method's shared state does not answer anything alone.
        """
        from sapt.errors import SaptError

        raise SaptError(f"the shared state of {self.name} answers nothing alone: load the pool version",
                        source=str(state_dir))
