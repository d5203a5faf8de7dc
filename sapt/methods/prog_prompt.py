"""ProgPrompt (Razdaibiedina et al., ICLR 2023): a new soft prompt per task, earlier ones frozen, and
the concatenation of all of them, newest first, in front of every input: ``[P_t; ...; P_1; x]``.

Each task's prompt starts from random rows of the vocabulary embedding, trains with the plain LM
loss (optionally through a residual MLP that is dropped after the task) and is then frozen. At test
time every input gets the full concatenation: no task id, and the input grows by ``prompt_length``
positions per task. Nothing of the data is kept (the official default, ``data_replay_freq = -1``).

Departures from the official code (``arazd/ProgressivePrompts``, baselines.md 3), and why:
- The run's ``train`` section (lr, epochs, batch) replaces lr 0.3 and 10 epochs, so that a
  comparison gives every method one budget; the preset ``prog-prompt`` and
  ``tuning/prog-prompt.yaml`` set a prompt-sized learning rate.
- The task's last prompt is kept, not the best one on validation (the official early stopping):
  no method here selects checkpoints, so every method of a comparison trains the same steps.
- The platform's instruction templates (``data/templates.py``), as for every method here, not the
  official code's per-dataset verbalisers over label options.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import (
    Method,
    Stage,
    StateFiles,
    check_finished_count,
    frozen_for_inference,
    read_state_file,
)
from sapt.pet import pool_files
from sapt.pet.progressive_prompts import ProgressivePromptModel, ProgressivePrompts
from sapt.pet.soft_prompt import load_prompts, save_prompt

STATE_FILE = "progprompt.json"


class ProgPromptArgs(BaseModel):
    """``method_args`` of prog-prompt (defaults: the official T5 runs)."""

    model_config = ConfigDict(extra="forbid")
    prompt_length: int = Field(10, ge=1, description="Soft-prompt vectors per task; the input grows by this per task.")
    residual_mlp: bool = Field(False, description="Train each new prompt through a residual MLP (dropped after the task).")
    mlp_hidden: int = Field(800, ge=1, description="Bottleneck of the residual MLP.")


class ProgPrompt(Method):
    """One frozen prompt per finished task plus the new one, all concatenated in front of the input."""

    name = "prog-prompt"
    Config = ProgPromptArgs

    def _model(self, backbone: Backbone, old_prompts: torch.Tensor, seed: int, mlp: bool) -> ProgressivePromptModel:
        embedding = backbone.model.get_input_embeddings().weight
        prompts = ProgressivePrompts(embedding, self.args.prompt_length, old_prompts, torch.Generator().manual_seed(seed),
                                     mlp_hidden=self.args.mlp_hidden if mlp else None)
        return ProgressivePromptModel(backbone.model, prompts, is_encoder_decoder=backbone.is_encoder_decoder)

    def _saved_prompts(self, backbone: Backbone, state_dir: Path, count: int) -> torch.Tensor:
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        folders = [pool_files.block_dir(state_dir, i) for i in range(count)]
        return load_prompts(folders, self.args.prompt_length, dim)

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        old = 0 if state_dir is None or stage.fresh else _read_state(state_dir, self.name)["blocks"]
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        old_prompts = self._saved_prompts(backbone, state_dir, old) if old else torch.zeros(0, self.args.prompt_length, dim)
        model = self._model(backbone, old_prompts, seed=stage.row, mlp=self.args.residual_mlp)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.prompts.prompt.requires_grad_(True)
        if model.prompts.mlp is not None:
            model.prompts.mlp.requires_grad_(True)
        return model

    def save(self, model: ProgressivePromptModel, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, prompt in enumerate(model.prompts.per_task()):
            save_prompt(prompt, pool_files.block_dir(out_dir, index))
        (out_dir / STATE_FILE).write_text(json.dumps({"method": self.name, "blocks": model.prompts.num_tasks}, indent=2))

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        blocks = _read_state(state_dir, self.name)["blocks"]
        check_finished_count(state_dir / STATE_FILE, blocks, task_index, "prompts", "blocks")
        return StateFiles(blocks=pool_files.block_paths(blocks), shared=(STATE_FILE,))

    def load_finished(self, backbone: Backbone, state_dir: Path) -> ProgressivePromptModel:
        blocks = _read_state(state_dir, self.name)["blocks"]
        if blocks < 1:
            raise SaptError("state holds no prompt", source=str(state_dir / STATE_FILE), field="blocks")
        saved = self._saved_prompts(backbone, state_dir, blocks)
        model = self._model(backbone, saved[:-1], seed=0, mlp=False)
        with torch.no_grad():
            model.prompts.prompt.copy_(saved[-1])
        return frozen_for_inference(model)

    def load_block(self, backbone: Backbone, block_dir: Path) -> ProgressivePromptModel:
        """One task's prompt alone in front of every input."""
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        prompt = load_prompts([block_dir], self.args.prompt_length, dim)[0]
        model = self._model(backbone, torch.zeros(0, self.args.prompt_length, dim), seed=0, mlp=False)
        with torch.no_grad():
            model.prompts.prompt.copy_(prompt)
        return frozen_for_inference(model)


def _read_state(state_dir: Path, method: str) -> dict:
    return read_state_file(state_dir / STATE_FILE, method, "blocks")
