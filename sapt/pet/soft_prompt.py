"""Soft prompts in front of a frozen backbone's input embeddings, for training and generation.

Every prompt method (SAPT-Prompt, ProgPrompt, L2P) ends in the same two calls: ``prompted_inputs``
builds the backbone's keyword arguments with a per-input prompt (B, P, d) in front of the token
embeddings, and ``generate_prompted`` runs ``generate`` from them. Decoder-only sequences are
left-padded, so the prompt sits before the padding: the padding stays masked and the answer still
ends the sequence. Block files (``prompt.safetensors``, one (P, d) tensor per block) are read here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sapt.errors import SaptError

IGNORE_INDEX = -100
PROMPT_FILE = "prompt.safetensors"  # one (P, d) tensor "prompt" per block folder


def vocabulary_rows(embedding: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """``length`` rows of the (frozen) embedding matrix drawn at random: the usual soft-prompt start."""
    rows = torch.randint(0, embedding.shape[0], (length,), generator=generator).to(embedding.device)
    return embedding.detach()[rows].clone()


def prompted_inputs(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_BPd: torch.Tensor, labels: torch.Tensor | None, *, is_encoder_decoder: bool) -> dict:
    """Backbone keyword arguments: the prompt's vectors, then the tokens' embeddings.

    Decoder-only labels get IGNORE_INDEX for the prompt positions (no loss on them); seq2seq labels
    belong to the decoder and are left as they are.
    """
    embeddings = backbone.get_input_embeddings()(input_ids)
    batch, length = input_ids.shape[0], prompt_BPd.shape[1]
    kwargs = {
        "inputs_embeds": torch.cat([prompt_BPd.to(embeddings.dtype), embeddings], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1),
        "labels": labels,
    }
    if labels is not None and not is_encoder_decoder:
        kwargs["labels"] = torch.cat([labels.new_full((batch, length), IGNORE_INDEX), labels], dim=1)
    return kwargs


@torch.no_grad()
def generate_prompted(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_BPd: torch.Tensor, *, is_encoder_decoder: bool, **kwargs) -> torch.Tensor:
    """``generate`` with the prompt in front; returns prompt + answer ids for decoder-only models,
    as a plain ``generate`` on ``input_ids`` would (the soft prompt has no ids to return)."""
    inputs = prompted_inputs(backbone, input_ids, attention_mask, prompt_BPd, None,
                             is_encoder_decoder=is_encoder_decoder)
    inputs.pop("labels")
    out = backbone.generate(**inputs, **kwargs)
    if not is_encoder_decoder:
        out = torch.cat([input_ids, out], dim=1)  # from embeddings HF returns the new tokens only
    return out


def save_prompt(prompt_Pd: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt": prompt_Pd.detach().float().cpu().contiguous()}, str(folder / PROMPT_FILE))


def load_prompts(folders: list[Path], length: int | None, dim: int) -> torch.Tensor:
    """The prompts of these block folders as one (n, P, d) tensor.

    Raises:
        SaptError: a block file is missing or its tensor does not fit (P, d).
    """
    prompts = []
    for folder in folders:
        path = folder / PROMPT_FILE
        if not path.is_file():
            raise SaptError("prompt block missing", source=str(path))
        prompt = load_file(str(path)).get("prompt")
        if prompt is None or prompt.dim() != 2 or prompt.shape[1] != dim or (length is not None and prompt.shape[0] != length):
            shape = None if prompt is None else tuple(prompt.shape)
            raise SaptError(f"expected one tensor 'prompt' of shape ({length or 'P'}, {dim}), found {shape}",
                            source=str(path))
        prompts.append(prompt)
    return torch.stack(prompts)
