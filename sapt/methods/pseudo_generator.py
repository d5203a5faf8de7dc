"""ARM's pseudo-sample generator: a small LoRA on the frozen backbone that writes a task's inputs.

Trained per task on pairs (GENERATE_PROMPT -> the task's formatted prompt: instruction + input,
no answer), then sampled. The authors add three special tokens and generate the instruction and
the input as two fields that are re-assembled; here the generator writes the whole prompt in the
task's own template, so no embedding is resized and no re-assembly is needed (docs/sapt.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sapt.backbones.types import Backbone
from sapt.data.collate import Collator
from sapt.methods.base import GeneratorSettings
from sapt.methods.lora import new_lora

GENERATE_PROMPT = "__gen__"
GENERATOR_DIR = "generator"  # inside a stage's final checkpoint


@dataclass(frozen=True)
class _LoraShape:
    lora_r: int
    lora_alpha: float
    lora_dropout: float


def new_generator(backbone: Backbone, settings: GeneratorSettings) -> nn.Module:
    """A fresh LoRA generator on the (frozen) backbone."""
    return new_lora(backbone, _LoraShape(settings.lora_r, settings.lora_alpha, settings.lora_dropout))


def generator_collator(backbone: Backbone, settings: GeneratorSettings) -> Collator:
    """Short sources (the prompt token), long targets (whole task prompts)."""
    return Collator(backbone.tokenizer, backbone.is_encoder_decoder, max_source_len=16,
                    max_target_len=settings.max_new_tokens)


def generator_batch(collator: Collator, sources: Sequence[str]) -> dict[str, torch.Tensor]:
    """One training batch: each real prompt becomes the target of GENERATE_PROMPT."""
    return collator.train_batch([GENERATE_PROMPT] * len(sources), list(sources))


def prompt_lengths(collator: Collator, sources: Sequence[str]) -> list[int]:
    """The token length of each real prompt as the generator learns it (cut at ``max_new_tokens``)."""
    return [len(row) - 1 for row in collator.target_ids(sources)]  # less the end token


@torch.no_grad()
def sample_prompts(model, collator: Collator, count: int, settings: GeneratorSettings, *, seed: int,
                   device: torch.device | str = "cpu", lengths: Sequence[int] = ()) -> list[str]:
    """Samples ``count`` pseudo prompts (top-k sampling with a repetition penalty, as in SAPT).

    With ``lengths`` (real prompts' token lengths) each prompt is cut to a length drawn from them,
    its end token held back until then: the router max-pools a prompt's embeddings, and short
    pseudo prompts of a long-prompt task pool like another task's (docs/sapt.md)."""
    torch.manual_seed(seed)
    drawn = random.Random(seed).choices(list(lengths), k=count) if lengths else None
    batch = {k: v.to(device) for k, v in collator.generation_batch([GENERATE_PROMPT] * count).items()}
    out = model.generate(
        **batch,
        do_sample=True,
        top_k=settings.top_k,
        repetition_penalty=settings.repetition_penalty,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=max(drawn) if drawn else None,
        num_beams=1,
        pad_token_id=collator.pad_id,
        eos_token_id=collator.eos_id,
    )
    start = batch["input_ids"].shape[1] if not collator.is_encoder_decoder else 1  # past the prompt / decoder start
    out = out[:, start:]
    if drawn:
        return collator.decode([row[:length] for row, length in zip(out.tolist(), drawn)])
    return collator.decode(out)
