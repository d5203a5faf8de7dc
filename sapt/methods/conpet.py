"""ConPET (Song et al. 2023, arXiv 2309.14763), carried over to instruction generation (baselines.md 1.5):
``conpet-static`` and ``conpet-dynamic``.

``conpet-static``: Static ConPET with EMR*: one LoRA trained on every task in turn, with ConPET's
dynamic replay sampler. From the second task on, every batch holds ``1 - old_share`` items of the
new task and ``old_share`` remembered items drawn task-uniformly (an earlier task first, then one
of its items), and an epoch has a fixed number of batches (``steps_per_epoch``), so a task costs
the same whatever the number of earlier tasks. The pool behind the old slots is the full history
of earlier tasks, as the released code uses (``memory_per_task`` caps it). Stores real data.

Departures from the released code, and why:
- EMR* only. EA-EMR* aligns the new model's sentence embeddings of memory samples to stored ones
  through a learned linear layer before a classification head, and CRL* adds contrastive replay and
  prototype-KL over label prototypes: both are defined on a classifier's embedding space and
  label set, which instruction generation has not; the released README does not present EWC and
  LwF as Static ConPET.
- One generation LoRA (the run's ``pet`` rank, alpha and targets) replaces LoRA r 4 on q,k plus a
  linear head over all labels: the tasks here are generated answers, not label indices.
- ``steps_per_epoch`` null (default) means one pass over the new task's items per epoch, its
  size whatever the number of earlier tasks; ConPET's per-dataset ``batch_limit`` (0.8 x 100 ...
  2500 batches) is a number to set per benchmark. The 20% of the budget ConPET spends on
  validation batches is not drawn: nothing here selects checkpoints.
- The first task trains on its own data alone, as in the released code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import (
    MEMORY_KEY, TASK_KEY, MemorySpec, Method, Stage, StateFiles, check_finished_count, frozen_for_inference, model_inputs,
    read_state_file,
)
from sapt.methods.lora import SeqLora
from sapt.pet import pool_files
from sapt.pet.lora_pool import Routing, inject_lora_pool
from sapt.pet.selected_lora import SelectedLoraModel


class ConpetStaticArgs(BaseModel):
    """``method_args`` of conpet-static (defaults: the released code's EMR* settings): its dynamic replay."""

    model_config = ConfigDict(extra="forbid")
    memory_per_task: int | None = Field(None, ge=1, description="Items kept of each task; null: all (the full history).")
    old_share: float = Field(0.5, gt=0, lt=1, description="Share of each batch from memory (batch_new_old_ratio 1).")
    steps_per_epoch: int | None = Field(None, ge=1, description="Batches per epoch from task 2 on; null: one pass over the new task.")


def _dynamic_replay(args: ConpetStaticArgs) -> MemorySpec:
    """ConPET's replay: the full history (or a cap) of real items, balanced batches, a fixed budget."""
    return MemorySpec(source="real", use="replay", fraction=1.0, per_task=args.memory_per_task, mix="balanced",
                      old_share=args.old_share, steps_per_epoch=args.steps_per_epoch)


class ConpetStatic(SeqLora):
    """Static ConPET (EMR*): one LoRA, balanced task-uniform replay of the full history, a fixed budget."""

    name = "conpet-static"
    Config = ConpetStaticArgs

    def memory(self) -> MemorySpec:
        return _dynamic_replay(self.args)


SELECTOR_DIR = "selector"  # the selector's own LoRA (a PEFT adapter folder) and its task head
SELECTOR_ADAPTER, SELECTOR_HEAD = "selector/adapter", "selector/head.safetensors"
STATE_FILE = "conpet.json"


class ConpetDynamicArgs(ConpetStaticArgs):
    """``method_args`` of conpet-dynamic (defaults: the released code's README runs): the same replay
    (the selector's data), plus the selection."""

    top_k: int = Field(1, ge=1, description="Experts the selector picks per input at test time (expert_topk).")
    selector_weight: float = Field(1.0, gt=0, description="Weight of the selector's cross-entropy beside the LM loss.")


class ConpetDynamic(Method):
    """Dynamic ConPET: one LoRA expert per task, a selector LoRA + growing task head, top-k at test.

    Each task trains its new expert on the task's own items and, in the same batches (ConPET's
    balanced replay of earlier tasks' real items), the selector on every item's task id. At test the
    selector picks the top-k experts (weight 1/k each) and they generate. Stores real data: the
    selector needs replay.

    Departures from the released code, and why:
    - The selector and the new expert train together in one pass over the same balanced batches
      (the released code trains the selector first, then the expert, on the same sampler): the two
      share no parameters and, with teacher forcing and k = 1, the expert's loss does not depend on
      the selector, so the order only changes which steps see which draws. A remembered item goes
      to its own frozen expert only, which gives no gradient: it skips the expert pass.
    - Selector features: the mean-pooled last hidden state of the prompt (encoder output for T5)
      with the selector's LoRA on, in place of the hidden state at a [MASK] cloze position; heads over
      label logits become generation by the selected expert(s). With k > 1 the experts' LoRAs are
      mixed with weight 1/k (ConPET merges their label logits; generation has no label slots).
    - Every expert starts from a fresh LoRA and the selector from the previous task's selector,
      rather than the released chain where the new expert starts from the selector's LoRA.
    - No output cache: it only saves compute for k > 1 on classification logits.
    """

    name = "conpet-dynamic"
    Config = ConpetDynamicArgs

    def memory(self) -> MemorySpec:
        return _dynamic_replay(self.args)

    def _attach(self, backbone: Backbone, old_experts: int, state_dir: Path | None, seed: int) -> SelectedLoraModel:
        routing = Routing()
        self._backbone = backbone
        self._layers = inject_lora_pool(
            backbone.model, backbone.lora_targets, routing, rank=self.pet.lora_r, alpha=self.pet.lora_alpha,
            dropout=self.pet.lora_dropout, old_blocks=old_experts, new_blocks=2,  # the new expert, the selector
        )
        if old_experts:
            pool_files.load_lora_blocks(state_dir, old_experts, self._layers)
            self._load_selector_lora(state_dir)
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        head = nn.Linear(dim, old_experts + 1)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            head.weight.normal_(0.0, dim ** -0.5, generator=generator)
            head.bias.zero_()
            if old_experts:
                saved = _read_head(state_dir, _read_state(state_dir, self.name)["experts"], dim)
                head.weight[:old_experts] = saved["weight"][:old_experts]
                head.bias[:old_experts] = saved["bias"][:old_experts]  # a new row keeps its fresh initialisation
        return SelectedLoraModel(backbone.model, routing, self._layers, head, top_k=self.args.top_k,
                                 is_encoder_decoder=backbone.is_encoder_decoder)

    def _load_selector_lora(self, state_dir: Path) -> None:
        pool_files.load_into_slot(pool_files.read_lora_adapter(state_dir / SELECTOR_ADAPTER, self._layers),
                                  self._layers, slot=1)

    @staticmethod
    def _load_head(model: SelectedLoraModel, state_dir: Path, rows: int) -> None:
        """The saved head, all ``rows`` rows (a head of another size is replaced)."""
        saved = _read_head(state_dir, rows, model.head.in_features)
        if model.head.out_features != rows:
            model.head = nn.Linear(model.head.in_features, rows)
        with torch.no_grad():
            model.head.weight.copy_(saved["weight"])
            model.head.bias.copy_(saved["bias"])

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        old = 0 if state_dir is None or stage.fresh else _read_state(state_dir, self.name)["experts"]
        model = self._attach(backbone, old, state_dir, seed=stage.row)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in self._layers.values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        for parameter in model.head.parameters():
            parameter.requires_grad_(True)
        return model

    def loss(self, model, batch, reflect=None):
        out = model(**model_inputs(batch), task=batch.get(TASK_KEY), memory=batch.get(MEMORY_KEY))
        total = out.loss + self.args.selector_weight * out.selector_loss
        picked = out.selector_logits.argmax(dim=-1)
        accuracy = float((picked == batch[TASK_KEY]).float().mean()) if TASK_KEY in batch else float("nan")
        return total, {"lm": float(out.loss.detach()), "selector_ce": float(out.selector_loss.detach()),
                       "selector_accuracy": accuracy}

    @torch.no_grad()
    def attention(self, model, batch):
        return model.block_weights(batch["input_ids"], batch["attention_mask"])

    def save(self, model: SelectedLoraModel, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        backbone = self._backbone
        common = dict(targets=backbone.lora_targets, alpha=self.pet.lora_alpha,
                      is_encoder_decoder=backbone.is_encoder_decoder, base_model=backbone.name)
        experts = model.num_experts
        for index in range(experts):
            pool_files.save_lora_block(self._layers, index, pool_files.block_dir(out_dir, index), **common)
        pool_files.save_lora_block(self._layers, experts, out_dir / SELECTOR_ADAPTER, **common)
        head = model.head
        save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                   "bias": head.bias.detach().float().cpu().contiguous()}, str(out_dir / SELECTOR_HEAD))
        (out_dir / STATE_FILE).write_text(json.dumps({"method": self.name, "experts": experts}, indent=2))

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        experts = _read_state(state_dir, self.name)["experts"]
        check_finished_count(state_dir / STATE_FILE, experts, task_index, "experts", "experts")
        return StateFiles(blocks=pool_files.block_paths(experts), shared=(STATE_FILE, SELECTOR_DIR))

    def load_finished(self, backbone: Backbone, state_dir: Path) -> SelectedLoraModel:
        experts = _read_state(state_dir, self.name)["experts"]
        if experts < 1:
            raise SaptError("state holds no expert", source=str(state_dir / STATE_FILE), field="experts")
        model = self._attach(backbone, experts - 1, state_dir, seed=0)
        pool_files.load_newest_lora_block(state_dir, experts - 1, self._layers, slot=0)
        self._load_head(model, state_dir, experts)
        return frozen_for_inference(model)

    def load_shared(self, backbone: Backbone, state_dir: Path, blocks: int) -> SelectedLoraModel:
        """The selector alone (its LoRA and head): the experts each input would be given."""
        experts = _read_state(state_dir, self.name)["experts"]
        model = self._attach(backbone, 0, None, seed=0)  # slot 0 stays an empty expert (B = 0)
        self._load_selector_lora(state_dir)
        self._load_head(model, state_dir, experts)
        return frozen_for_inference(model)


def _read_state(state_dir: Path, method: str) -> dict:
    return read_state_file(state_dir / STATE_FILE, method, "experts")


def _read_head(state_dir: Path, rows: int, dim: int) -> dict[str, torch.Tensor]:
    path = state_dir / SELECTOR_HEAD
    if not path.is_file():
        raise SaptError("selector head missing", source=str(path))
    saved = load_file(str(path))
    weight, bias = saved.get("weight"), saved.get("bias")
    if weight is None or bias is None or tuple(weight.shape) != (rows, dim) or tuple(bias.shape) != (rows,):
        raise SaptError(f"expected weight ({rows}, {dim}) and bias ({rows},)", source=str(path))
    return saved
