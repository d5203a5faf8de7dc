"""SAPT (Zhao et al., ACL 2024): shared attentive learning and selection over a pool of PET blocks,
kept from forgetting by attentive reflection (ARM). ``sapt-lora`` and ``sapt-prompt``.

At task t the pool holds t blocks: t-1 frozen ones and a fresh one. The router (projection + one
key per block) weights them per input, in training and at test time alike; no task id anywhere.
Trainable: the new block, the new key, the projection. ARM: after each task its mean attention on
its validation inputs is stored; later tasks add lambda * sum_i KL(stored_i || router(pseudo_i)).

The ``ablation`` key switches to the paper's Table 2 variants (docs/sapt.md says what each does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import (
    GeneratorSettings, MemorySpec, Method, Stage, StateFiles, check_finished_count, model_inputs,
)
from sapt.pet import pool_files
from sapt.pet.lora_pool import PooledLoraLinear, Routing, inject_lora_pool
from sapt.pet.prompt_pool import PromptPool
from sapt.pet.reflection import padded_target, reflection_kl
from sapt.pet.routed_model import RoutedModel
from sapt.pet.router import SharedAttention
from sapt.pet.soft_prompt import load_prompts, save_prompt

STATE_FILE = "sapt.json"
SELECTOR_DIR = "selector"

Ablation = Literal["none", "no-arm", "replay", "no-alignment", "no-sa", "real-inputs"]

# ablation -> what is kept of each finished task (sapt-method.md 2; the paper's Table 2)
_MEMORY: dict[str, tuple[str, str] | None] = {
    "none": ("pseudo", "reflect"),
    "no-arm": None,
    "replay": ("real", "replay"),
    "no-alignment": ("pseudo", "reflect"),
    "no-sa": ("pseudo", "reflect"),
    "real-inputs": ("real", "reflect"),
}


class SaptArgs(BaseModel):
    """``method_args`` of sapt-lora (defaults: the authors' scripts, sapt-method.md 1 and 3)."""

    model_config = ConfigDict(extra="forbid")
    ablation: Ablation = Field("none", description="The paper's Table 2 variant; none is SAPT itself.")
    # 2 = what the authors' SuperNI/T5 runs applied in effect (0.5 x 4 accumulation steps, sapt-method.md 2.5);
    # here the KL is scaled like the LM loss, so the number means the same at any grad_accum.
    kl_weight: float = Field(2.0, ge=0, description="lambda, on the ARM loss summed over earlier tasks.")
    projection_dim: int = Field(100, ge=1, description="Bottleneck h of the query projection.")
    temperature: float | None = Field(None, gt=0, description="Logit divisor; null: sqrt(embedding size).")
    projection_layout: Literal["code", "paper"] = Field(
        "code", description="code: Linear-Linear-SiLU-LN (what the authors ran); paper: Linear-SiLU-Linear-LN.")
    masked_pooling: bool = Field(True, description="false pools padding too, as the authors' code does.")
    router_lr: float | None = Field(None, gt=0, description="Own learning rate for projection and keys; null: train.lr.")
    router_warmup_steps: int = Field(
        0, ge=0, description="Micro-batches at the start of tasks 2.. during which the router does not train (no ARM "
                             "either): the new block first learns under the weight its key gives it.")
    key_init: Literal["inputs", "random"] = Field(
        "random", description="The new key at tasks 2..: inputs points it from the remembered inputs' mean query to the "
                              "new task's (validation inputs, before training); random is the authors' uniform(-1, 1).")
    query_center: Literal["none", "first-tasks", "stream"] = Field(
        "none", description="Subtracted from every pooled input before the query projection: first-tasks, the "
                            "midpoint of the first two tasks' mean pooled embeddings (their validation inputs), "
                            "fixed from the start of task 2; stream, the mean of every task's mean so far, moved at "
                            "each task's start; none is the authors'.")
    own_block_weight: float = Field(
        0.0, ge=0, description="mu, on a cross-entropy that pulls the new task's training inputs toward its own block "
                               "(tasks 2..); 0 is the authors' (the router learns from the LM loss and ARM only). A "
                               "new block starts silent (LoRA B = 0), so the LM loss first moves the weight to the "
                               "old, trained blocks; this keeps the new task on its block while it learns.")
    memory_fraction: float = Field(0.02, gt=0, le=1, description="Pseudo (or real) samples per task, share of train.")
    generator_steps: int = Field(300, ge=1, description="Optimizer steps of each task's generator.")
    generator_lr: float = Field(1e-3, gt=0)
    generator_lora_r: int = Field(8, ge=1)
    generator_lora_alpha: float = Field(32, gt=0)
    generator_lora_dropout: float = Field(0.1, ge=0, lt=1)
    generator_top_k: int = Field(20, ge=1)
    generator_repetition_penalty: float = Field(2.5, gt=0)
    generator_max_new_tokens: int = Field(
        64, ge=1, description="Pseudo prompt length: the generator learns each prompt's first this many tokens "
                              "(instruction + head of the input: what routing reads) and samples up to it.")
    generator_lengths: Literal["free", "real"] = Field(
        "free", description="free ends each pseudo prompt where the generator writes its end token (the authors'); "
                            "real samples each to a length drawn from the task's own prompts (at most "
                            "generator_max_new_tokens): the router's max-pooled input grows with a prompt's length.")
    generator_stop_window: int = Field(25, ge=1, description="Steps per window of the generator's stopping rule.")
    generator_min_improvement: float = Field(
        0.02, ge=0, lt=1, description="Stop the generator once a window's mean loss is not this much (relative) "
                                     "below the best window before it; 0 runs all generator_steps.")


class SaptPromptArgs(SaptArgs):
    """``method_args`` of sapt-prompt."""

    prompt_length: int = Field(10, ge=1, description="Soft-prompt vectors per block.")


class _Sapt(Method):
    """What both variants share: router, ARM, ablations, state files. Subclasses own the pool."""

    Config = SaptArgs
    post_task_split = "val"  # ARM's target: the mean attention of the task's validation inputs

    @property
    def start_task_pass(self) -> bool:  # key_init aims the new key from the inputs' queries; query_center
        return self.args.key_init == "inputs" or self.args.query_center != "none"  # pools task 2's inputs

    def __init__(self, args: SaptArgs, pet):
        super().__init__(args, pet)
        self.targets: list[list[float]] = []  # stored mean attention of each finished task
        self._micro_batches = 0  # training micro-batches of this stage so far (router_warmup_steps)
        self._backbone: Backbone | None = None

    # -- the pool, per variant ---------------------------------------------------------------
    def _attach_pool(self, backbone: Backbone, routing: Routing, old_blocks: int, state_dir: Path | None,
                     seed: int) -> PromptPool | None:
        raise NotImplementedError

    def _save_pool(self, model: RoutedModel, out_dir: Path) -> None:
        raise NotImplementedError

    def _new_block_parameters(self, model: RoutedModel) -> list[nn.Parameter]:
        raise NotImplementedError

    # -- Method ----------------------------------------------------------------------------------
    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        old_blocks = 0
        self.targets = []
        if state_dir is not None and not stage.fresh:
            state = _read_state(state_dir, self.name)
            old_blocks, self.targets = state["blocks"], state["targets"]
        self._backbone = backbone
        routing = Routing()
        prompts = self._attach_pool(backbone, routing, old_blocks, state_dir, seed=stage.row)
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        router = self._new_router(dim, old_blocks, state_dir)
        ablation = self.args.ablation
        selector = None
        if ablation == "no-alignment":
            selector = self._new_router(dim, old_blocks, state_dir / SELECTOR_DIR if state_dir else None)
        model = RoutedModel(
            backbone.model, router, routing, is_encoder_decoder=backbone.is_encoder_decoder, prompts=prompts,
            train_weights="newest" if ablation == "no-sa" else "attention",
            selection={"no-sa": "top1", "no-alignment": "selector"}.get(ablation, "attention"),
            selector=selector,
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = [*self._new_block_parameters(model), router.new_key, *router.projection.parameters()]
        if selector is not None:
            trainable += [selector.new_key, *selector.projection.parameters()]
        for parameter in trainable:
            parameter.requires_grad_(True)
        return model

    def load_finished(self, backbone: Backbone, state_dir: Path) -> RoutedModel:
        """The model exactly as it was after the last task saved in ``state_dir``, for inference:
        its t blocks and t keys, nothing trainable, in eval mode (selection as the ablation says).

        Raises:
            SaptError: the folder is not a finished state of this method, or does not fit the backbone.
        """
        state = _read_state(state_dir, self.name)
        blocks = state["blocks"]
        if blocks < 1:
            raise SaptError("state holds no block", source=str(state_dir / STATE_FILE), field="blocks")
        self.targets = state["targets"]
        self._backbone = backbone
        routing = Routing()
        # Blocks 1..t-1 go to the frozen part, block t into the "new" slot: the same layout as training.
        prompts = self._attach_pool(backbone, routing, blocks - 1, state_dir, seed=0)
        self._load_newest_block(prompts, state_dir, blocks)
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        router = self._finished_router(dim, blocks, state_dir)
        selector = self._finished_router(dim, blocks, state_dir / SELECTOR_DIR) if self.args.ablation == "no-alignment" else None
        model = RoutedModel(
            backbone.model, router, routing, is_encoder_decoder=backbone.is_encoder_decoder, prompts=prompts,
            selection={"no-sa": "top1", "no-alignment": "selector"}.get(self.args.ablation, "attention"),
            selector=selector,
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()

    def _finished_router(self, dim: int, blocks: int, folder: Path) -> SharedAttention:
        """A router holding all ``blocks`` saved keys: t-1 as frozen keys, the last as the new key."""
        router = self._new_router(dim, blocks, folder)
        with torch.no_grad():
            router.new_key.copy_(router.old_keys[-1:])
        router.old_keys = router.old_keys[:-1].clone()
        return router

    def _load_newest_block(self, prompts, state_dir: Path, blocks: int) -> None:
        raise NotImplementedError

    def _new_router(self, dim: int, old_blocks: int, state_dir: Path | None) -> SharedAttention:
        router = SharedAttention(dim, self.args.projection_dim, self.args.temperature, self.args.projection_layout,
                                 self.args.masked_pooling)
        router.old_keys = torch.zeros(old_blocks, dim)
        if old_blocks:
            saved = pool_files.read_router_config(state_dir)
            for key in ("dim", "hidden", "layout"):
                if saved[key] != router.describe()[key]:
                    raise SaptError(f"saved router has {key}={saved[key]!r}, this run asks {router.describe()[key]!r}",
                                    source=str(state_dir / pool_files.ROUTER_CONFIG), field=key)
            pool_files.load_router_into(router, state_dir)
        return router

    @torch.no_grad()
    def start_task_sums(self, model, batch):
        sums = {}
        if self.args.key_init == "inputs":
            sums["query"] = model.queries(batch["input_ids"], batch["attention_mask"]).float().sum(dim=0)
        if self._moves_center(model, at_start=True):
            sums["pooled"] = model.pooled_embeddings(batch["input_ids"], batch["attention_mask"]).float().sum(dim=0)
        return sums

    @torch.no_grad()
    def start_task(self, model, new, new_count, old, old_count):
        """key_init "inputs": the new key points from the mean query of the remembered inputs of
        earlier tasks to that of the new task's inputs, so the new block starts with most of its
        task's weight and little of the old tasks'. A zero-initialised block gives the router no
        reason to move there by itself: the LM loss first rewards whatever old block helps, and the
        new block then learns under the sliver of weight it is left with."""
        report = {}
        if self._moves_center(model, at_start=True) and new_count:
            # The mean of the k task means so far (k blocks now): at task 2 the midpoint of tasks 1 and 2,
            # both off the center on opposite sides (centred on task 1 alone, its inputs pooled to near
            # zero and spread over every block: it was forgotten).
            k = model.num_blocks
            model.router.center.mul_((k - 1) / k).add_(new["pooled"] / new_count / k)
            report["query_center_norm"] = round(float(model.router.center.norm()), 4)
        if self.args.key_init != "inputs" or model.num_blocks == 1 or not new_count or not old_count:
            return report or None  # task 1 (one key, no gradient) or nothing kept: the authors' random key
        new_mean, old_mean = new["query"] / new_count, old["query"] / old_count
        model.router.aim_new_key(new_mean - old_mean)
        keys = model.router.keys()
        share = torch.softmax(torch.stack([new_mean, old_mean]) @ keys.T / model.router.temperature, dim=-1)[:, -1]
        # (with query_center, the queries above were pooled under task 1's center: the aim is approximate)
        return {**report, "key_init": "inputs",
                "new_block_weight_of_mean_query": {"new task": round(float(share[0]), 4),
                                                   "remembered": round(float(share[1]), 4)}}

    def loss(self, model, batch, reflect=None):
        frozen = model.num_blocks > 1 and self._micro_batches < self.args.router_warmup_steps
        self._micro_batches += 1
        memory = [] if frozen else list((reflect or {}).items())
        out = model(**model_inputs(batch), reflect=[(b["input_ids"], b["attention_mask"]) for _, b in memory] or None,
                    router_frozen=frozen)
        total, terms = out.loss, {"lm": float(out.loss.detach())}
        blocks = out.log_weights.shape[1]
        if blocks > 1:  # how much of the new task's weight its own block holds, epoch by epoch (history)
            terms["own_block_weight"] = float(out.log_weights[:, -1].detach().exp().mean())
        ablation = self.args.ablation
        if blocks > 1 and self.args.own_block_weight > 0 and not frozen and ablation != "no-sa":
            own = _newest_block_nll(out.log_weights)
            total = total + self.args.own_block_weight * own
            terms["own_block_ce"] = float(own.detach())
        if ablation in ("none", "real-inputs") and memory:
            kl = sum(reflection_kl(lw, padded_target(self._target(task, lw), blocks))
                     for (task, _), lw in zip(memory, out.reflect_log_weights))
            total = total + self.args.kl_weight * kl
            terms["arm_kl"] = float(kl.detach())
        elif ablation == "no-sa":
            # No shared attention: the router is a task classifier, trained beside the newest block.
            ce = _newest_block_nll(out.log_weights)
            for (task, _), lw in zip(memory, out.reflect_log_weights):
                ce = ce + F.nll_loss(lw, torch.full((lw.shape[0],), task, device=lw.device))
            total = total + ce
            terms["router_ce"] = float(ce.detach())
        elif ablation == "no-alignment":
            # A separate selector learns, after the fact, the attention the learning router produced.
            kl = reflection_kl(out.selector_log_weights, out.weights.detach())
            for (task, _), lw in zip(memory, out.reflect_selector_log_weights):
                kl = kl + reflection_kl(lw, padded_target(self._target(task, lw), blocks))
            total = total + kl
            terms["selector_kl"] = float(kl.detach())
        return total, terms

    def param_groups(self, model, lr):
        if self.args.router_lr is None:
            return None
        routing = {id(p) for name, p in model.named_parameters() if name.startswith(("router.", "selector."))}
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in trainable if id(p) not in routing], "lr": lr},
            {"params": [p for p in trainable if id(p) in routing], "lr": self.args.router_lr},
        ]

    def _target(self, task: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.targets[task], dtype=torch.float32, device=like.device)

    def memory(self) -> MemorySpec | None:
        kind = _MEMORY[self.args.ablation]
        if kind is None:
            return None
        a = self.args
        generator = GeneratorSettings(
            steps=a.generator_steps, lr=a.generator_lr, lora_r=a.generator_lora_r, lora_alpha=a.generator_lora_alpha,
            lora_dropout=a.generator_lora_dropout, top_k=a.generator_top_k,
            repetition_penalty=a.generator_repetition_penalty, max_new_tokens=a.generator_max_new_tokens,
            stop_window=a.generator_stop_window, min_improvement=a.generator_min_improvement,
            lengths=a.generator_lengths,
        ) if kind[0] == "pseudo" else None
        return MemorySpec(source=kind[0], use=kind[1], fraction=a.memory_fraction, generator=generator)

    @torch.no_grad()
    def attention(self, model, batch):
        return model.block_weights(batch["input_ids"], batch["attention_mask"])

    @torch.no_grad()
    def post_task_sums(self, model, batch, targets):
        sums = {"attention": self.attention(model, batch).float().sum(dim=0)}
        if self._moves_center(model, at_start=False):
            sums["pooled"] = model.pooled_embeddings(batch["input_ids"], batch["attention_mask"]).float().sum(dim=0)
        return sums

    def _moves_center(self, model, at_start: bool) -> bool:
        """Whether query_center moves the center now. Both modes set it after task 1 (one block: its
        mean), while the router has learned nothing yet (task 1's single key and the projection get no
        gradient), and make it the midpoint at task 2's start; stream moves it again at every later start."""
        mode, blocks = self.args.query_center, model.num_blocks
        if mode == "none":
            return False
        if not at_start:
            return blocks == 1
        return blocks == 2 if mode == "first-tasks" else blocks >= 2

    def finish_task(self, model, task, sums, count):
        mean = sums["attention"] / max(count, 1)
        self.remember(model, task, mean)
        report = {"train_attention": [float(v) for v in mean]}
        if self._moves_center(model, at_start=False):
            # Every task's pooled embeddings share most of their direction (cosine 0.98 between the
            # task means of long-3 on minilm-t5): the keys then see one input. The first task's mean
            # is half of the center; task 2's start makes it the midpoint (start_task).
            center = sums["pooled"] / max(count, 1)
            model.router.center.copy_(center)
            report["query_center_norm"] = round(float(center.norm()), 4)
        return report

    def remember(self, model, task: int, mean_attention: torch.Tensor) -> None:
        """Keeps finished task ``task``'s mean attention as its ARM target."""
        if task != len(self.targets):
            raise RuntimeError(f"attention target for task {task} arrives after {len(self.targets)} targets")
        if self.args.ablation == "no-sa":  # a classifier's target: all weight on the task's own block
            mean_attention = F.one_hot(torch.tensor(task), len(mean_attention)).float()
        self.targets.append(mean_attention.detach().float().tolist())  # plain floats, off the graph

    def save(self, model: RoutedModel, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self._save_pool(model, out_dir)
        pool_files.save_router(model.router, out_dir)
        if model.selector is not None:
            pool_files.save_router(model.selector, out_dir / SELECTOR_DIR)
        # Epoch checkpoints save mid-task, when the newest block has no target yet: the next
        # stage refuses such a state (_read_state), only a finished task's state carries on.
        state = {"method": self.name, "blocks": model.num_blocks, "targets": self.targets,
                 "ablation": self.args.ablation}
        (out_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        state = _read_state(state_dir, self.name)
        check_finished_count(state_dir / STATE_FILE, state["blocks"], task_index, "blocks", "blocks")
        shared = [pool_files.ROUTER_WEIGHTS, pool_files.ROUTER_CONFIG, STATE_FILE]
        if (state_dir / SELECTOR_DIR).is_dir():
            shared.append(SELECTOR_DIR)
        return StateFiles(blocks=pool_files.block_paths(state["blocks"]), shared=tuple(shared))

    def load_shared(self, backbone: Backbone, state_dir: Path, blocks: int) -> RoutedModel:
        """The router (and the no-alignment selector) on the bare backbone: block weights only."""
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        router = self._finished_router(dim, blocks, state_dir)
        selector = self._finished_router(dim, blocks, state_dir / SELECTOR_DIR) if self.args.ablation == "no-alignment" else None
        model = RoutedModel(backbone.model, router, Routing(), is_encoder_decoder=backbone.is_encoder_decoder,
                            selection={"no-sa": "top1", "no-alignment": "selector"}.get(self.args.ablation, "attention"),
                            selector=selector)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()


def _newest_block_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """Mean -log of the newest block's weight: the cross-entropy of "these inputs are the new task's"."""
    newest = torch.full((log_weights.shape[0],), log_weights.shape[1] - 1, device=log_weights.device)
    return F.nll_loss(log_weights, newest)


def _read_state(state_dir: Path, method: str) -> dict:
    path = state_dir / STATE_FILE
    if not path.is_file():
        raise SaptError(f"not a {method} state folder", source=str(path))
    state = json.loads(path.read_text())
    if state.get("method") != method:
        raise SaptError(f"state of method {state.get('method')!r}, not {method!r}", source=str(path), field="method")
    if len(state["targets"]) != state["blocks"]:
        raise SaptError(f"{state['blocks']} blocks but {len(state['targets'])} attention targets: saved mid-task",
                        source=str(path), field="targets")
    return state


class SaptLora(_Sapt):
    """SAPT-LoRA: one LoRA block per task on every query and value projection, mixed by output."""

    name = "sapt-lora"

    def _attach_pool(self, backbone, routing, old_blocks, state_dir, seed):
        self._layers = inject_lora_pool(
            backbone.model, backbone.lora_targets, routing, rank=self.pet.lora_r, alpha=self.pet.lora_alpha,
            dropout=self.pet.lora_dropout, old_blocks=old_blocks,
        )
        if old_blocks:
            pool_files.load_lora_blocks(state_dir, old_blocks, self._layers)
        return None

    def _new_block_parameters(self, model):
        return [p for layer in self._layers.values() for p in (layer.lora_A, layer.lora_B)]

    def _load_newest_block(self, prompts, state_dir, blocks):
        pool_files.load_newest_lora_block(state_dir, blocks - 1, self._layers)

    def _save_pool(self, model, out_dir):
        backbone = self._backbone
        for index in range(model.num_blocks):
            pool_files.save_lora_block(
                self._layers, index, pool_files.block_dir(out_dir, index), targets=backbone.lora_targets,
                alpha=self.pet.lora_alpha, is_encoder_decoder=backbone.is_encoder_decoder, base_model=backbone.name,
            )

    def pooled_layers(self) -> dict[str, PooledLoraLinear]:
        return self._layers


class SaptPrompt(_Sapt):
    """SAPT-Prompt: one soft prompt per task; the per-input mix is prepended to the input embeddings."""

    name = "sapt-prompt"
    Config = SaptPromptArgs

    def _attach_pool(self, backbone, routing, old_blocks, state_dir, seed):
        embedding = backbone.model.get_input_embeddings().weight
        pool = PromptPool(embedding, self.args.prompt_length, old_blocks, torch.Generator().manual_seed(seed))
        if old_blocks:
            pool.load_old_blocks(load_prompts(_block_folders(state_dir, old_blocks), self.args.prompt_length,
                                                      embedding.shape[1]))
        return pool

    def _new_block_parameters(self, model):
        return [model.prompts.prompt]

    def _load_newest_block(self, prompts, state_dir, blocks):
        saved = load_prompts(_block_folders(state_dir, blocks), self.args.prompt_length, prompts.prompt.shape[1])
        with torch.no_grad():
            prompts.prompt.copy_(saved[-1])

    def _save_pool(self, model, out_dir):
        for index, prompt in enumerate(model.prompts.prompts()):
            save_prompt(prompt, pool_files.block_dir(out_dir, index))

    def load_block(self, backbone: Backbone, block_dir: Path) -> RoutedModel:
        """The prompt alone, prepended to every input (one block: any router gives it weight 1)."""
        embedding = backbone.model.get_input_embeddings().weight
        prompt = load_prompts([block_dir], None, embedding.shape[1])[0]
        pool = PromptPool(embedding, prompt.shape[0], 0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            pool.prompt.copy_(prompt)
        return RoutedModel(backbone.model, SharedAttention(embedding.shape[1]), Routing(),
                           is_encoder_decoder=backbone.is_encoder_decoder, prompts=pool).eval()


def _block_folders(state_dir: Path, count: int) -> list[Path]:
    return [pool_files.block_dir(state_dir, i) for i in range(count)]
