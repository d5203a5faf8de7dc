"""LFPT5 (Qin & Joty, ICLR 2022): one long soft prompt, trained on every task in turn as the task solver
and as a generator of its tasks' examples, with pseudo examples of earlier tasks and a KD term.

At task t the prompt continues from where task t-1 left it (its snapshot is kept frozen), and the
task gets a generation token of its own. Each training item (real or pseudo, of any task) gives

    L_task  the LM loss of its answer, prompt in front                       [P; x] -> y
    L_lm    the LM loss of the whole example behind its task's token        [P; g_task] -> x Answer: y
    L_kd    on pseudo items only: KL(snapshot's answer distribution || the prompt's), per answer token

    L = (1 - kd_weight) * (L_task + lm_weight * L_lm) + kd_weight * L_kd

Before each new task, the prompt as it stands writes ``memory_fraction`` of every earlier task's
training size in pseudo examples behind that task's token (top-k sampling), split at the answer mark
(``Answer:``) into input and output; unparsed samples are dropped (results.json's ``timing`` records the share
that parsed; the split is on token ids). The platform samples them with Ray Data (``MemorySpec.source == "self"``), and mixes
them into the new task's training stream flagged as memory. At test: the prompt alone, no task id.

Departures from the official code (``qcwthu/Lifelong-Fewshot-Language-Learning``, baselines.md 3), and why:
- The prompt goes in front of the input, as for every prompt method here (the official code appends it
  after the input embeddings of T5's encoder): one code path for T5 and decoder-only backbones.
- A generation token is one trainable vector per task in front of the generator's (empty) input,
  not a new vocabulary entry: the backbone's embedding matrix stays frozen and unresized.
- The run's ``train`` section (AdamW, lr, epochs, batch) replaces Adafactor at lr 0.5, so that a
  comparison gives every method one budget; the preset ``lfpt5`` sets a prompt-sized learning rate.
- The answer mark is ``Answer:`` (the official ``__ans__`` is six pieces in the tokenizers here, this
  two whole tokens); samples are split at its last occurrence, on token ids.
- The KD term is the mean over pseudo items' answer tokens of the KL between the snapshot's and the
  prompt's token distributions (the official code sums it per position, with temperature 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from sapt.backbones.types import Backbone
from sapt.errors import SaptError
from sapt.methods.base import (
    MEMORY_KEY, TASK_KEY, MemorySpec, Method, SampleSettings, Stage, StateFiles, check_finished_count,
    frozen_for_inference, model_inputs, read_state_file,
)
from sapt.pet.generative_prompt import ANSWER_MARK, GenerativePrompt, PromptBank
from sapt.pet.soft_prompt import IGNORE_INDEX, vocabulary_rows

STATE_FILE, PROMPT_FILE = "lfpt5.json", "lfpt5_prompt.safetensors"


class Lfpt5Args(BaseModel):
    """``method_args`` of lfpt5 (defaults: the official scripts; pseudo volume: SAPT's comparison)."""

    model_config = ConfigDict(extra="forbid")
    prompt_length: int = Field(300, ge=1, description="Soft-prompt vectors, shared by every task.")
    lm_weight: float = Field(0.25, ge=0, description="lambda_lm, on the generation loss.")
    kd_weight: float = Field(0.01, ge=0, lt=1, description="lambda_kd, on the KD term (pseudo items only).")
    memory_fraction: float = Field(0.02, gt=0, le=1, description="Pseudo examples per earlier task, share of its train set.")
    top_k: int = Field(64, ge=1, description="Top-k sampling of pseudo examples.")
    max_new_tokens: int = Field(128, ge=4, description="Longest pseudo example (input, mark and output), in tokens.")


class Lfpt5(Method):
    """One prompt for all tasks, a generation token per task, pseudo replay of every earlier task, KD."""

    name = "lfpt5"
    Config = Lfpt5Args

    def memory(self) -> MemorySpec:
        return MemorySpec(source="self", use="replay", fraction=self.args.memory_fraction,
                          sampling=SampleSettings(top_k=self.args.top_k, max_new_tokens=self.args.max_new_tokens))

    # -- the model ---------------------------------------------------------------------------
    def _model(self, backbone: Backbone, prompt, old_tokens, new_token, snapshot) -> GenerativePrompt:
        self._backbone = backbone
        bank = PromptBank(prompt, old_tokens, new_token, snapshot)
        return GenerativePrompt(backbone.model, bank, is_encoder_decoder=backbone.is_encoder_decoder)

    def _saved(self, backbone: Backbone, state_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        state = _read_state(state_dir, self.name)
        path = state_dir / PROMPT_FILE
        if not path.is_file():
            raise SaptError("prompt missing", source=str(path))
        saved = load_file(str(path))
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        prompt, tokens = saved.get("prompt"), saved.get("generation_tokens")
        if prompt is None or tuple(prompt.shape) != (self.args.prompt_length, dim) or tokens is None \
                or tuple(tokens.shape) != (state["tasks"], dim):
            raise SaptError(f"expected 'prompt' ({self.args.prompt_length}, {dim}) and 'generation_tokens' "
                            f"({state['tasks']}, {dim})", source=str(path))
        return prompt, tokens

    def build(self, backbone: Backbone, state_dir: Path | None, stage: Stage) -> nn.Module:
        embedding = backbone.model.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(stage.row)
        new_token = vocabulary_rows(embedding, 1, generator)[0]
        if state_dir is None or stage.fresh:
            prompt = vocabulary_rows(embedding, self.args.prompt_length, generator)
            model = self._model(backbone, prompt, embedding.new_zeros(0, embedding.shape[1]), new_token, None)
        else:
            prompt, tokens = self._saved(backbone, state_dir)
            model = self._model(backbone, prompt, tokens, new_token, prompt)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.bank.prompt.requires_grad_(True)
        model.bank.new_token.requires_grad_(True)
        self._has_snapshot = not (state_dir is None or stage.fresh)
        return model

    # -- the loss ----------------------------------------------------------------------------
    def _answer_mark(self) -> list[int]:
        return self._backbone.tokenizer(f" {ANSWER_MARK} ", add_special_tokens=False)["input_ids"]

    def generation_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator's items from a solver batch: an empty input (the task token stands in front)
        and the whole example, ``input Answer: output``, as the target."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        mark = self._answer_mark()
        tokenizer = self._backbone.tokenizer
        eos = tokenizer.eos_token_id
        rows = []
        for b in range(ids.shape[0]):
            answer = labels[b][labels[b] != IGNORE_INDEX].tolist()
            if self._backbone.is_encoder_decoder:
                source = ids[b][mask[b].bool()].tolist()
                source = source[:-1] if source and source[-1] == eos else source
            else:
                source = ids[b][mask[b].bool() & (labels[b] == IGNORE_INDEX)].tolist()
            rows.append(source + mark + answer)
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        device = ids.device
        if self._backbone.is_encoder_decoder:  # the decoder writes the example; the encoder reads nothing
            target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=device)
            for b, row in enumerate(rows):
                target[b, : len(row)] = torch.tensor(row, device=device)
            empty = ids.new_zeros(len(rows), 0)
            return {"input_ids": empty, "attention_mask": mask.new_zeros(len(rows), 0), "labels": target}
        tokens = torch.full((len(rows), width), pad, dtype=torch.long, device=device)  # left-padded, all supervised
        target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=device)
        attention = torch.zeros((len(rows), width), dtype=mask.dtype, device=device)
        for b, row in enumerate(rows):
            tokens[b, width - len(row):] = torch.tensor(row, device=device)
            target[b, width - len(row):] = tokens[b, width - len(row):]
            attention[b, width - len(row):] = 1
        return {"input_ids": tokens, "attention_mask": attention, "labels": target}

    def loss(self, model: GenerativePrompt, batch, reflect=None):
        inputs = model_inputs(batch)
        tasks = batch[TASK_KEY]
        solver = model(**inputs)
        generation = model(**self.generation_batch(inputs), tasks=tasks).loss
        kd = solver.loss.new_zeros(())
        if self._has_snapshot:
            # Every batch of a later task runs the snapshot, remembered items in it or not: under
            # ZeRO-3 a forward is a collective call, and another rank's batch may hold some.
            remembered = batch.get(MEMORY_KEY, torch.zeros(len(tasks), dtype=torch.bool, device=tasks.device))
            kd = self._kd(model, inputs, solver.logits, remembered.bool())
        a = self.args
        total = (1 - a.kd_weight) * (solver.loss + a.lm_weight * generation) + a.kd_weight * kd
        return total, {"lm": float(solver.loss.detach()), "generation": float(generation.detach()),
                       "kd": float(kd.detach())}

    def _kd(self, model: GenerativePrompt, inputs, logits: torch.Tensor, remembered: torch.Tensor) -> torch.Tensor:
        """Mean over the remembered items' answer tokens of KL(snapshot || prompt). The snapshot reads
        the whole batch, as the prompt did: the same inputs give the same logits while the two agree."""
        with torch.no_grad():
            old = model(**inputs, old=True).logits[remembered]
        if not bool(remembered.any()):
            return logits.new_zeros(())
        new = logits[remembered]
        labels = inputs["labels"][remembered]
        if not model.is_encoder_decoder:
            # The logits cover the sequence's last positions (all of them, the soft prompt's included,
            # or from just before the first answer token on): labels right-aligned to them, then
            # position i's logits against token i + 1.
            width = new.shape[1]
            labels = F.pad(labels, (max(width - labels.shape[1], 0), 0), value=IGNORE_INDEX)[:, -width:][:, 1:]
            new, old = new[:, :-1], old[:, :-1]
        answer = labels != IGNORE_INDEX
        kl = F.kl_div(F.log_softmax(new[answer].float(), -1), F.log_softmax(old[answer].float(), -1),
                      log_target=True, reduction="none").sum(-1)
        return kl.mean()

    # -- pseudo examples ---------------------------------------------------------------------
    @torch.no_grad()
    def sample_memory(self, model: GenerativePrompt, collator, task, count, *, seed, device="cpu"):
        torch.manual_seed(seed)
        empty = torch.zeros(count, 0, dtype=torch.long, device=device)
        out = model.generate(empty, empty.clone(), tasks=torch.full((count,), task, device=device), do_sample=True,
                             top_k=self.args.top_k, max_new_tokens=self.args.max_new_tokens, num_beams=1,
                             pad_token_id=collator.pad_id, eos_token_id=collator.eos_id)
        mark = self._answer_mark()
        items = []
        for row in out.tolist():
            split = split_at_mark(row, mark)
            if split is None:
                continue
            source, target = collator.decode(split)
            if source and target:
                items.append({"source": source, "target": target})
        return items

    # -- state -------------------------------------------------------------------------------
    def save(self, model: GenerativePrompt, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        bank = model.bank
        save_file({"prompt": bank.prompt.detach().float().cpu().contiguous(),
                   "generation_tokens": bank.tokens().detach().float().cpu().contiguous()}, str(out_dir / PROMPT_FILE))
        (out_dir / STATE_FILE).write_text(json.dumps({"method": self.name, "tasks": bank.num_tasks}, indent=2))

    def finished_files(self, state_dir: Path, task_index: int) -> StateFiles:
        tasks = _read_state(state_dir, self.name)["tasks"]
        check_finished_count(state_dir / STATE_FILE, tasks, task_index, "generation tokens", "tasks")
        return StateFiles(blocks=(), shared=(STATE_FILE, PROMPT_FILE))

    def load_finished(self, backbone: Backbone, state_dir: Path) -> GenerativePrompt:
        prompt, tokens = self._saved(backbone, state_dir)
        if not len(tokens):
            raise SaptError("state holds no task", source=str(state_dir / STATE_FILE), field="tasks")
        return frozen_for_inference(self._model(backbone, prompt, tokens[:-1], tokens[-1], prompt))


def split_at_mark(ids: list[int], mark: list[int]) -> tuple[list[int], list[int]] | None:
    """A generated example's ids split at the last answer mark into input and output (an input may
    contain the words, an answer seldom does); None without one. On ids, not text: a tokenizer need
    not give the mark back as the same characters."""
    for start in range(len(ids) - len(mark), -1, -1):
        if ids[start:start + len(mark)] == mark:
            return ids[:start], ids[start + len(mark):]
    return None


def _read_state(state_dir: Path, method: str) -> dict:
    return read_state_file(state_dir / STATE_FILE, method, "tasks")
