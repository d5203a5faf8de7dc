"""Turns batches of strings into model tensors, for seq2seq and decoder-only backbones alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from sapt.data.templates import ANSWER_CUE
from sapt.errors import SaptError

_CONTENT = "\u2063SAPT-PROMPT\u2063"  # stands for the prompt while the chat template is rendered once


def uses_chat_template(tokenizer, is_encoder_decoder: bool, prompt_format: str) -> bool:
    """``train.prompt_format`` for one backbone: chat for a decoder-only model whose tokenizer has a
    template (``auto``) or when asked (``chat``, an error without a template); raw otherwise."""
    has_template = not is_encoder_decoder and bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise SaptError("chat needs a decoder-only backbone whose tokenizer has a chat template", source="config",
                        field="train.prompt_format")
    return prompt_format != "raw" and has_template


def _cleans_up_spaces(tokenizer) -> bool:
    """WordPiece-style decoding joins "a , b" into "a, b"; transformers skips that for BPE vocabularies
    (SmolLM2's), and warns when asked to, so it is asked only where it applies."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is None or type(backend.model).__name__ != "BPE"


def _chat_wrapper(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the chat template puts before and after a user's prompt (the assistant's turn opened)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(_CONTENT)
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])

IGNORE_INDEX = -100  # label positions the loss skips


class Collator:
    """Tokenizes prompts and answers the way each backbone family expects.

    Seq2seq: the prompt goes to the encoder (cut from the right at ``max_source_len``), the answer
    plus EOS becomes ``labels``. Decoder-only: prompt and answer are one left-padded sequence whose
    loss covers the answer tokens only (sapt-method.md 4.5); a prompt over ``max_source_len`` loses
    the end of its task input but keeps the answer cue it ends with (``templates.ANSWER_CUE``), since
    the model answers right after it. With ``chat``, a decoder-only prompt is the user's turn of the
    tokenizer's chat template, the answer (with the tokenizer's EOS, which ends a turn) the assistant's.
    """

    def __init__(self, tokenizer, is_encoder_decoder: bool, max_source_len: int, max_target_len: int, *,
                 chat: bool = False):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self._cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        self._clean_up_spaces = _cleans_up_spaces(tokenizer)
        # Chat: each prompt is the user's turn of the tokenizer's template, the answer the assistant's.
        self._chat_head: list[int] = []
        self._chat_tail: list[int] = []
        if chat:
            self._chat_head, self._chat_tail = _chat_wrapper(tokenizer)
            if len(self._chat_head) + len(self._chat_tail) + 8 > max_source_len:
                raise SaptError(f"{max_source_len} tokens leave too little room for the prompt inside the chat "
                                f"template's {len(self._chat_head) + len(self._chat_tail)}", source="config",
                                field="train.max_source_len")

    @classmethod
    def for_backbone(cls, backbone, max_source_len: int, max_target_len: int, prompt_format: str = "raw") -> Collator:
        """A collator for ``backbone`` (its tokenizer and family) with ``train.prompt_format`` resolved."""
        return cls(backbone.tokenizer, backbone.is_encoder_decoder, max_source_len, max_target_len,
                   chat=uses_chat_template(backbone.tokenizer, backbone.is_encoder_decoder, prompt_format))

    def _encode(self, texts: Sequence[str], limit: int, special: bool) -> list[list[int]]:
        encoded = self.tokenizer(list(texts), add_special_tokens=special, truncation=True, max_length=limit)
        return encoded["input_ids"]

    def _decoder_prompts(self, sources: Sequence[str]) -> list[list[int]]:
        limit = self.max_source_len - len(self._chat_head) - len(self._chat_tail)
        # One token over the limit marks a prompt that must be cut; the others stay as tokenized whole.
        rows = self._encode(sources, limit + 1, special=False)
        cue = self._cue
        for i, (row, source) in enumerate(zip(rows, sources)):
            if len(row) > limit:
                if source.endswith(ANSWER_CUE) and len(cue) < limit:
                    body = source[: -len(ANSWER_CUE)]
                    rows[i] = self._encode([body], limit - len(cue), special=False)[0] + cue
                else:
                    rows[i] = row[:limit]
        return [self._chat_head + row + self._chat_tail for row in rows] if self._chat_head else rows

    def _answers(self, targets: Sequence[str]) -> list[list[int]]:
        ids = self._encode(targets, self.max_target_len - 1, special=False)
        return [row + [self.eos_id] for row in ids]

    def target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Each target's token ids as training sees them: cut at ``max_target_len``, end token last."""
        return self._answers(targets)

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

    def decode(self, rows) -> list[str]:
        """Token id rows to text, special tokens dropped, surrounding whitespace stripped."""
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=self._clean_up_spaces)
        return [t.strip() for t in texts]

    def _pad(self, rows: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left" if left else "right",
                                    return_attention_mask=True, return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    @staticmethod
    def _pad_labels(rows: list[list[int]], left: bool) -> torch.Tensor:
        # tokenizer.pad fills input_ids with its pad token only, never labels with IGNORE_INDEX.
        return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                            padding_value=IGNORE_INDEX, padding_side="left" if left else "right")
