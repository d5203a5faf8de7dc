"""LFPT5's prompt (Qin & Joty, ICLR 2022): one long soft prompt that solves every task and, behind a
task's generation token, writes that task's examples (``input __ans__ output``).

solver:     [P; x]        -> y
generator:  [P; g_task]   -> x ANSWER_MARK y     (g_task: one trainable vector per task)
snapshot:   [P_old; x]    -> the answer distribution of the prompt as it was before this task, for
                             the KD term on remembered (pseudo) items

Earlier tasks' generation tokens and the snapshot are frozen buffers; the prompt and the newest
generation token train (the snapshot equals the prompt at the first step of a task: KD starts at 0). Shapes: B batch, L prompt length, n tasks so far, d embedding size.
"""

from __future__ import annotations

import torch
from torch import nn

from sapt.pet.soft_prompt import generate_prompted, prompted_inputs

ANSWER_MARK = "Answer:"  # separates a generated example's input from its output


class PromptBank(nn.Module):
    """The prompt, the per-task generation tokens and the snapshot.

    Args:
        prompt: the prompt to train from, (L, d).
        old_tokens: the earlier tasks' generation tokens, (n-1, d).
        new_token: the start of this task's generation token, (d,).
        snapshot: the prompt before this task, (L, d); None at the first task.
    """

    def __init__(self, prompt: torch.Tensor, old_tokens: torch.Tensor, new_token: torch.Tensor,
                 snapshot: torch.Tensor | None):
        super().__init__()
        self.prompt = nn.Parameter(prompt.clone())
        self.new_token = nn.Parameter(new_token.clone())
        self.register_buffer("old_tokens", old_tokens.clone())
        self.register_buffer("snapshot", (snapshot if snapshot is not None else prompt).clone())

    @property
    def num_tasks(self) -> int:
        return self.old_tokens.shape[0] + 1

    def tokens(self) -> torch.Tensor:
        """Every task's generation token, oldest first: (n, d)."""
        return torch.cat([self.old_tokens.to(self.new_token.dtype), self.new_token.unsqueeze(0)], dim=0)

    def forward(self, batch: int, tasks_B: torch.Tensor | None = None, old: bool = False) -> torch.Tensor:
        """(B, L, d): the prompt (or the snapshot), followed by each input's generation token when
        ``tasks_B`` is given: (B, L + 1, d). Called as a module, so that ZeRO-3 gathers the prompt."""
        prompt = (self.snapshot if old else self.prompt).to(self.prompt.dtype)
        out = prompt.unsqueeze(0).expand(batch, -1, -1)
        if tasks_B is None:
            return out
        return torch.cat([out, self.tokens()[tasks_B].unsqueeze(1)], dim=1)


class GenerativePrompt(nn.Module):
    """A frozen backbone with LFPT5's prompt bank in front of every input."""

    def __init__(self, backbone: nn.Module, bank: PromptBank, *, is_encoder_decoder: bool):
        super().__init__()
        self.backbone = backbone
        self.bank = bank
        self.is_encoder_decoder = is_encoder_decoder

    def forward(self, input_ids, attention_mask, labels=None, *, tasks=None, old: bool = False):
        """The backbone's output with the prompt (``old``: the snapshot) in front; with ``tasks``,
        the generation token of each input's task after it (the generator's inputs)."""
        prompt = self.bank(input_ids.shape[0], tasks, old)
        return self.backbone(**prompted_inputs(self.backbone, input_ids, attention_mask, prompt, labels,
                                               is_encoder_decoder=self.is_encoder_decoder))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, tasks=None, **kwargs) -> torch.Tensor:
        """The solver (``tasks`` None) or the generator of each input's task."""
        prompt = self.bank(input_ids.shape[0], tasks)
        return generate_prompted(self.backbone, input_ids, attention_mask, prompt,
                                 is_encoder_decoder=self.is_encoder_decoder, **kwargs)
