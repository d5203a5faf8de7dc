"""Batched greedy generation: prompts in, decoded answers out."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sapt.data.collate import Collator


@torch.no_grad()
def generate_answers(
    model,
    collator: Collator,
    sources: Sequence[str],
    *,
    max_new_tokens: int,
    device: torch.device,
    synced_gpus: bool = False,
    batch: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Greedy-decodes one batch of prompts (num_beams 1, as in SAPT's evaluation).

    ``synced_gpus`` keeps ZeRO-3 ranks stepping together while their sequences differ in length.
    ``batch``: ``sources`` already tokenized by ``collator.generation_batch`` and on ``device``.
    """
    if batch is None:
        batch = {k: v.to(device) for k, v in collator.generation_batch(sources).items()}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=collator.pad_id,
        eos_token_id=collator.eos_id,
        synced_gpus=synced_gpus,
    )
    if not collator.is_encoder_decoder:
        out = out[:, batch["input_ids"].shape[1] :]  # drop the (left-padded) prompt
    return collator.decode(out)
