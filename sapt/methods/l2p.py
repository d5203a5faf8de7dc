"""L2P (Wang et al., CVPR 2022), on language models as in the SAPT paper's comparison: one shared pool
of ``pool_size`` prompts of ``prompt_length`` vectors with one key each, trained on every task in turn.

Every input queries the pool with the frozen, prompt-free backbone's mean-pooled feature, picks the
``top_n`` prompts whose keys are closest in cosine, and gets them in front of its embeddings, in
training and at test alike (``pet/l2p_pool.py``). Loss: the LM loss plus ``pull_weight`` times the
summed ``1 - cos`` of the selected keys (the official ``pull_constraint_coeff`` 0.1). No task id,
no data kept, a constant prompt length whatever the number of tasks.

"Prompt size 10" (SAPT paper, Appendix C) is read as L_p = 10: each of the pool's prompts has 10
vectors, and an input gets ``top_n`` x 10 of them (50 by default). The other reading, 10 vectors in
all, is ``prompt_length: 2`` with ``top_n: 5``.

Departures from the official code (``google-research/l2p``, and its PyTorch port), and why:
- Query: the mean of the last hidden states over the input's tokens (T5: the encoder's; decoder-only:
  the prompt part), in place of a ViT's [CLS] feature: text backbones here have no [CLS] token.
- No batch-wise prompt selection at test (the official option picks the batch's most frequent
  prompts): it makes one input's answer depend on the other inputs of its batch.
- No task-wise prompt masking during training (an option that needs the task id to reserve
  prompts per task), so no task id is used anywhere.
- The run's ``train`` section (lr, epochs, batch) for every method of a comparison; the preset
  ``l2p`` and ``tuning/l2p.yaml`` set a prompt-sized learning rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import (
    Method,
    Stage,
    StateFiles,
    frozen_for_inference,
    model_inputs,
    read_state_file,
)
from sapt.pet.l2p_pool import L2PModel, L2PPool

STATE_FILE, POOL_FILE = "l2p.json", "l2p_pool.safetensors"


class L2PArgs(BaseModel):
    """``method_args`` of l2p (defaults: the official configs, with L_p = 10 for "prompt size 10")."""

    model_config = ConfigDict(extra="forbid")
    pool_size: int = Field(10, ge=1, description="Prompts in the shared pool (M).")
    top_n: int = Field(5, ge=1, description="Prompts each input selects (N); at most pool_size.")
    prompt_length: int = Field(10, ge=1, description="Vectors per prompt (L_p); an input gets top_n x this many.")
    pull_weight: float = Field(0.1, ge=0, description="Weight of the pull term on the selected keys.")
    prompt_init: Literal["uniform", "vocabulary"] = Field(
        "uniform", description="uniform(-1, 1) as the official code; vocabulary: random rows of the embedding.")

    @field_validator("top_n")
    @classmethod
    def _top_n_fits(cls, top_n, info):
        pool_size = info.data.get("pool_size")
        if pool_size is not None and top_n > pool_size:
            raise ValueError(f"{top_n} is more than pool_size ({pool_size})")
        return top_n


class L2P(Method):
    """A shared prompt pool with keys; top-N cosine selection per input, the same in training and test."""

    name = "l2p"
    Config = L2PArgs

    def _new_pool(self, backbone: Backbone, seed: int) -> L2PPool:
        embedding = backbone.model.get_input_embeddings().weight.detach()
        a = self.args
        generator = torch.Generator().manual_seed(seed)
        dim = embedding.shape[1]
        if a.prompt_init == "uniform":
            prompts = torch.rand(a.pool_size, a.prompt_length, dim, generator=generator) * 2 - 1
        else:
            rows = torch.randint(0, embedding.shape[0], (a.pool_size * a.prompt_length,), generator=generator)
            prompts = embedding.cpu()[rows].float().reshape(a.pool_size, a.prompt_length, dim)
        keys = torch.rand(a.pool_size, dim, generator=generator) * 2 - 1
        return L2PPool(prompts.to(embedding.dtype), keys.to(embedding.dtype), a.top_n)

    def _saved_pool(self, backbone: Backbone, state_dir: Path) -> L2PPool:
        _read_state(state_dir, self.name)
        path = state_dir / POOL_FILE
        if not path.is_file():
            raise SaptError("prompt pool missing", source=str(path))
        saved = load_file(str(path))
        a = self.args
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        expected = {"prompts": (a.pool_size, a.prompt_length, dim), "keys": (a.pool_size, dim)}
        for key, shape in expected.items():
            if key not in saved or tuple(saved[key].shape) != shape:
                found = tuple(saved[key].shape) if key in saved else None
                raise SaptError(f"expected {key!r} of shape {shape}, found {found}", source=str(path), field=key)
        return L2PPool(saved["prompts"], saved["keys"], a.top_n)

    def _model(self, backbone: Backbone, pool: L2PPool) -> L2PModel:
        return L2PModel(backbone.model, pool, is_encoder_decoder=backbone.is_encoder_decoder)

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        fresh = state_dir is None or stage.fresh
        pool = self._new_pool(backbone, seed=stage.row) if fresh else self._saved_pool(backbone, state_dir)
        model = self._model(backbone, pool)
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        pool.requires_grad_(True)
        return model

    def loss(self, model: L2PModel, batch, reflect=None):
        out = model(**model_inputs(batch))
        total = out.loss + self.args.pull_weight * out.pull
        return total, {"lm": float(out.loss.detach()), "pull": float(out.pull.detach())}

    def save(self, model: L2PModel, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        pool = model.pool
        save_file({"prompts": pool.prompts.detach().float().cpu().contiguous(),
                   "keys": pool.keys.detach().float().cpu().contiguous()}, str(out_dir / POOL_FILE))
        (out_dir / STATE_FILE).write_text(json.dumps({"method": self.name, "pool_size": pool.prompts.shape[0]}, indent=2))

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        _read_state(state_dir, self.name)
        if not (state_dir / POOL_FILE).is_file():
            raise SaptError("prompt pool missing", source=str(state_dir / POOL_FILE))
        return StateFiles(blocks=(), shared=(STATE_FILE, POOL_FILE))

    def load_finished(self, backbone: Backbone, state_dir: Path) -> L2PModel:
        return frozen_for_inference(self._model(backbone, self._saved_pool(backbone, state_dir)))


def _read_state(state_dir: Path, method: str) -> dict:
    return read_state_file(state_dir / STATE_FILE, method, "pool_size")
