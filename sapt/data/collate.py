"""Turns batches of strings into model tensors, for seq2seq and decoder-only backbones alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from sapt.data.templates import ANSWER_CUE

IGNORE_INDEX = -100  # label positions the loss skips


class Collator:
    """Tokenizes prompts and answers the way each backbone family expects.

    Seq2seq: the prompt goes to the encoder (cut from the right at ``max_source_len``), the answer
    plus EOS becomes ``labels``. Decoder-only: prompt and answer are one left-padded sequence whose
    loss covers the answer tokens only (sapt-method.md 4.5); a prompt over ``max_source_len`` loses
    the end of its task input but keeps the answer cue it ends with (``templates.ANSWER_CUE``), since
    the model answers right after it.
    """

    def __init__(self, tokenizer, is_encoder_decoder: bool, max_source_len: int, max_target_len: int):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def _encode(self, texts: Sequence[str], limit: int, special: bool) -> list[list[int]]:
        encoded = self.tokenizer(list(texts), add_special_tokens=special, truncation=True, max_length=limit)
        return encoded["input_ids"]

    def _decoder_prompts(self, sources: Sequence[str]) -> list[list[int]]:
        # One token over the limit marks a prompt that must be cut; the others stay as tokenized whole.
        rows = self._encode(sources, self.max_source_len + 1, special=False)
        cue = self._encode([ANSWER_CUE], self.max_source_len, special=False)[0]
        for i, (row, source) in enumerate(zip(rows, sources)):
            if len(row) > self.max_source_len:
                if source.endswith(ANSWER_CUE) and len(cue) < self.max_source_len:
                    body = source[: -len(ANSWER_CUE)]
                    rows[i] = self._encode([body], self.max_source_len - len(cue), special=False)[0] + cue
                else:
                    rows[i] = row[: self.max_source_len]
        return rows

    def _answers(self, targets: Sequence[str]) -> list[list[int]]:
        ids = self._encode(targets, self.max_target_len - 1, special=False)
        return [row + [self.eos_id] for row in ids]

    def train_batch(self, sources: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors for one training micro-batch: input_ids, attention_mask, labels."""
        answers = self._answers(targets)
        if self.is_encoder_decoder:
            prompts = self._encode(sources, self.max_source_len, special=True)
            batch = self._pad(prompts, left=False)
            batch["labels"] = self._pad_labels(answers, left=False)
            return batch
        prompts = self._decoder_prompts(sources)
        rows = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
        batch = self._pad(rows, left=True)
        batch["labels"] = self._pad_labels(labels, left=True)
        return batch

    def generation_batch(self, sources: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompt tensors for greedy generation (left padding for decoder-only models)."""
        if self.is_encoder_decoder:
            return self._pad(self._encode(sources, self.max_source_len, special=True), left=False)
        return self._pad(self._decoder_prompts(sources), left=True)

    def _pad(self, rows: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left" if left else "right",
                                    return_attention_mask=True, return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    @staticmethod
    def _pad_labels(rows: list[list[int]], left: bool) -> torch.Tensor:
        # tokenizer.pad fills input_ids with its pad token only, never labels with IGNORE_INDEX.
        return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                            padding_value=IGNORE_INDEX, padding_side="left" if left else "right")
