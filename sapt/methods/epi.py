"""EPI (Wang et al., ACL 2023, "Rehearsal-free continual language learning via efficient parameter
isolation"): a prefix per task, and at test time the one prefix of the task the input is identified as.

Task t trains a new prefix (past key/values in every layer; PEFT prefix tuning) on its own items,
earlier prefixes frozen. After it, the workers pass the task's training items through the frozen
backbone without any prefix and sum the mean-pooled features per class, their outer products and
counts (the seam's post-task pass); ``finish_task`` turns them into the task's class means and
adds its covariance to the shared one, kept as a pseudo-inverse (``pet/task_gaussians.py``). At
test, an input's task is the one whose nearest class mean is closest in Mahalanobis distance, and
only that task's prefix runs. No data is kept.

EPI needs each task's label set: a sequence with a task that has none (SuperNI's open answers, a
Long Sequence folder without labels.json) is refused before anything starts, never run with one
centroid per task (the SAPT paper reports "-" for EPI on SuperNI).

Departures from the official code, and why:
- Prefix length 10 (the SAPT paper's "prompt size 10" for every prompt baseline; the official
  README runs 16): ``prefix_length``.
- Feature: the mean of the frozen backbone's last hidden states over the input's tokens (T5: the
  encoder's; decoder-only: the prompt part); the official code mean-pools BERT's last layer.
- The prefix is PEFT's prefix tuning (no reparameterisation), without the official dropout on the
  past key/values; generation replaces a classifier head over the label range of the picked task.
- The run's ``train`` section (lr, epochs, batch) replaces lr 0.03, 5 epochs, batch 32, so that a
  comparison gives every method one budget.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import (
    Method,
    Stage,
    StateFiles,
    TaskInfo,
    frozen_for_inference,
    read_state_file,
)
from sapt.pet import pool_files
from sapt.pet.isolated_prefixes import IsolatedPrefixModel, adapter_name
from sapt.pet.task_gaussians import TaskGaussians

STATE_FILE, STATISTICS_FILE = "epi.json", "epi_statistics.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PREFIX_KEY = "prompt_embeddings"  # the tensor PEFT saves for a prefix adapter without projection


class EpiArgs(BaseModel):
    """``method_args`` of epi."""

    model_config = ConfigDict(extra="forbid")
    prefix_length: int = Field(10, ge=1, description="Virtual tokens of each task's prefix (SAPT's comparison: 10).")
    prefix_init: Literal["random", "last", "mean"] = Field(
        "random", description="A new prefix starts at random, or from the last / the mean of the earlier ones "
                              "(the official prompt_fusion_mode).")


class Epi(Method):
    """A prefix per task; test-time task identification by Mahalanobis distance to class means."""

    name = "epi"
    Config = EpiArgs
    post_task_split = "train"  # the statistics come from the task's training items

    def set_tasks(self, tasks: list[TaskInfo]) -> None:
        missing = [t.name for t in tasks if not t.labels]
        if missing:
            raise SaptError(f"epi identifies a task by its classes, and task(s) {', '.join(missing)} have no label set "
                            "(open answers: SuperNI tasks, or a Long Sequence folder without labels.json)",
                            source="config", field="order")
        super().set_tasks(tasks)

    # -- the model ---------------------------------------------------------------------------
    def _config(self, backbone: Backbone) -> PrefixTuningConfig:
        return PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM if backbone.is_encoder_decoder else TaskType.CAUSAL_LM,
                                  num_virtual_tokens=self.args.prefix_length)

    def _attach(self, backbone: Backbone, state_dir: Path | None, old: int, *, new: bool) -> IsolatedPrefixModel:
        """The backbone with the ``old`` saved prefixes (+ a fresh one when ``new``) and the statistics."""
        self._backbone = backbone
        blocks = [pool_files.block_dir(state_dir, i) for i in range(old)] if old else []
        for folder in blocks:
            for name in ADAPTER_FILES:
                if not (folder / name).is_file():
                    raise SaptError("not a PEFT prefix adapter folder", source=str(folder / name))
        # Under ZeRO-3 frozen prefixes are partitioned: the saved bytes of finished blocks are written back.
        self._old_blocks = [{name: (folder / name).read_bytes() for name in ADAPTER_FILES} for folder in blocks]
        try:
            if blocks:
                peft = PeftModel.from_pretrained(backbone.model, str(blocks[0]), adapter_name=adapter_name(0))
                for index, folder in enumerate(blocks[1:], start=1):
                    peft.load_adapter(str(folder), adapter_name=adapter_name(index))
                # PEFT reads an inference-mode prefix's weight directly; its forward is what ZeRO-3 gathers.
                for index in range(len(blocks)):
                    peft.peft_config[adapter_name(index)].inference_mode = False
                if new:
                    peft.add_adapter(adapter_name(old), self._config(backbone))
            else:
                peft = get_peft_model(backbone.model, self._config(backbone), adapter_name=adapter_name(0))
        except (ValueError, RuntimeError, KeyError) as err:  # PEFT's answers to a prefix of another shape
            raise SaptError(f"prefix does not fit the backbone: {err}", source=str(state_dir)) from None
        count = old + 1 if new else old
        peft.set_adapter(adapter_name(count - 1))
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        gaussians = TaskGaussians(dim)
        if state_dir is not None and old:
            gaussians.load(_read_statistics(state_dir, dim))
        return IsolatedPrefixModel(peft, gaussians, num_blocks=count, is_encoder_decoder=backbone.is_encoder_decoder)

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        old = 0
        if state_dir is not None and not stage.fresh:
            state = _read_state(state_dir, self.name)
            if state["statistics"] != state["blocks"]:
                raise SaptError(f"{state['blocks']} prefixes but statistics of {state['statistics']} tasks: saved "
                                "mid-task", source=str(state_dir / STATE_FILE), field="statistics")
            old = state["blocks"]
        self._task = stage.train_tasks[-1]
        model = self._attach(backbone, state_dir, old, new=True)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        newest = model.peft.prompt_encoder[model.newest]
        if old and self.args.prefix_init != "random":
            earlier = torch.stack([model.peft.prompt_encoder[adapter_name(i)].embedding.weight.detach() for i in range(old)])
            with torch.no_grad():
                newest.embedding.weight.copy_(earlier[-1] if self.args.prefix_init == "last" else earlier.mean(0))
        newest.requires_grad_(True)
        return model

    # -- after a task: its class statistics -----------------------------------------------------
    @torch.no_grad()
    def post_task_sums(self, model: IsolatedPrefixModel, batch, targets):
        labels = self.tasks[self._task].labels
        unknown = sorted({t for t in targets if t not in labels} - {""})  # "": a ZeRO-3 filler's or probe's
        if unknown:
            raise SaptError(f"answers outside the task's label set {list(labels)}: {unknown[:3]}",
                            source=self.tasks[self._task].name, field="labels")
        classes = torch.tensor([labels.index(t) if t in labels else 0 for t in targets], device=batch["input_ids"].device)
        return TaskGaussians.batch_sums(model.features(batch["input_ids"], batch["attention_mask"]), classes, len(labels))

    def finish_task(self, model: IsolatedPrefixModel, task, sums, count):
        model.gaussians.add_task(sums, count)
        return {"classes": len(self.tasks[task].labels), "items": count}

    # -- routing diagnostics: the task each input is identified as --------------------------------
    @torch.no_grad()
    def attention(self, model: IsolatedPrefixModel, batch):
        return model.block_weights(batch["input_ids"], batch["attention_mask"])

    # -- state -------------------------------------------------------------------------------
    def save(self, model: IsolatedPrefixModel, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, files in enumerate(self._old_blocks):
            folder = pool_files.block_dir(out_dir, index)
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
        self._save_prefix(model, pool_files.block_dir(out_dir, model.num_blocks - 1))
        save_file(model.gaussians.state(), str(out_dir / STATISTICS_FILE))
        state = {"method": self.name, "blocks": model.num_blocks, "statistics": model.gaussians.num_tasks}
        (out_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @staticmethod
    def _save_prefix(model: IsolatedPrefixModel, folder: Path) -> None:
        """The newest prefix as a PEFT adapter folder, written here: PEFT's own ``save_pretrained``
        runs the prompt encoder's forward, which under ZeRO-3 is a collective call that the other
        ranks (only rank 0 saves) never join."""
        config = copy.deepcopy(model.peft.peft_config[model.newest])
        config.inference_mode = True
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        weight = model.peft.prompt_encoder[model.newest].embedding.weight  # whole: the workers gather it to save
        save_file({PREFIX_KEY: weight.detach().float().cpu().contiguous()}, str(folder / ADAPTER_FILES[1]))

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        state = _read_state(state_dir, self.name)
        if state["blocks"] != task_index + 1 or state["statistics"] != task_index + 1:
            raise SaptError(f"{state['blocks']} prefixes and statistics of {state['statistics']} tasks, but task "
                            f"{task_index} (0-based) needs {task_index + 1} of each", source=str(state_dir / STATE_FILE))
        return StateFiles(blocks=pool_files.block_paths(state["blocks"]), shared=(STATE_FILE, STATISTICS_FILE))

    def load_finished(self, backbone: Backbone, state_dir: Path) -> IsolatedPrefixModel:
        state = _read_state(state_dir, self.name)
        if state["blocks"] < 1 or state["statistics"] != state["blocks"]:
            raise SaptError(f"{state['blocks']} prefixes and statistics of {state['statistics']} tasks: not a finished "
                            "state", source=str(state_dir / STATE_FILE), field="statistics")
        return frozen_for_inference(self._attach(backbone, state_dir, state["blocks"], new=False))


    def load_shared(self, backbone: Backbone, state_dir: Path, blocks: int) -> IsolatedPrefixModel:
        """The statistics alone on the bare backbone: the task each input would be given."""
        state = _read_state(state_dir, self.name)
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        gaussians = TaskGaussians(dim)
        gaussians.load(_read_statistics(state_dir, dim))
        model = IsolatedPrefixModel(None, gaussians, num_blocks=state["statistics"],
                                    is_encoder_decoder=backbone.is_encoder_decoder, backbone=backbone.model)
        return frozen_for_inference(model)


def _read_state(state_dir: Path, method: str) -> dict:
    state = read_state_file(state_dir / STATE_FILE, method, "blocks")
    if not isinstance(state.get("statistics"), int):
        raise SaptError("missing the statistics count", source=str(state_dir / STATE_FILE), field="statistics")
    return state


def _read_statistics(state_dir: Path, dim: int) -> dict[str, torch.Tensor]:
    path = state_dir / STATISTICS_FILE
    if not path.is_file():
        raise SaptError("task statistics missing", source=str(path))
    saved = load_file(str(path))
    shapes = {"covariance_sum": (dim, dim), "precision": (dim, dim)}
    for key in ("class_means", "class_task", *shapes):
        if key not in saved:
            raise SaptError(f"no tensor {key!r}", source=str(path), field=key)
    bad = [k for k, shape in shapes.items() if tuple(saved[k].shape) != shape]
    if bad or saved["class_means"].dim() != 2 or saved["class_means"].shape[1] != dim \
            or saved["class_task"].shape != saved["class_means"].shape[:1]:
        raise SaptError(f"statistics do not fit a backbone of width {dim}", source=str(path))
    return saved
