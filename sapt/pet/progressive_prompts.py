"""Progressive prompts (Razdaibiedina et al., ICLR 2023): one soft prompt per task, all of them in
front of every input, the newest first: ``[P_t; P_t-1; ...; P_1; x]``.

Earlier prompts are a frozen buffer; only the newest trains, optionally through a residual MLP
(``ResidualPromptMLP``) that exists during its task only: what is kept of a task is the prompt after
the MLP. Shapes: B batch, t tasks so far, P prompt length, d embedding size.
"""

from __future__ import annotations

import torch
from torch import nn

from sapt.pet.soft_prompt import generate_prompted, prompted_inputs, vocabulary_rows


class ResidualPromptMLP(nn.Module):
    """P -> P + LayerNorm(Linear(ReLU(Linear(P)))): ProgPrompt's reparameterisation of a new prompt."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.LayerNorm(dim))

    def forward(self, prompt_Pd: torch.Tensor) -> torch.Tensor:
        return prompt_Pd + self.mlp(prompt_Pd)


class ProgressivePrompts(nn.Module):
    """The prompts of t tasks: t-1 frozen ones and the newest one.

    Args:
        embedding: the backbone's (frozen) input embedding matrix, (vocab, d).
        length: prompt length per task (ProgPrompt: 10).
        old_prompts: the finished tasks' prompts, (t-1, P, d), oldest first.
        generator: seeds the newest prompt's start (rows of the vocabulary).
        mlp_hidden: size of the residual MLP's bottleneck; None trains the prompt directly.
    """

    def __init__(self, embedding: torch.Tensor, length: int, old_prompts: torch.Tensor, generator: torch.Generator,
                 mlp_hidden: int | None = None):
        super().__init__()
        dim = embedding.shape[1]
        if old_prompts.shape[1:] != (length, dim):
            raise ValueError(f"old prompts of shape {tuple(old_prompts.shape)}, expected (t-1, {length}, {dim})")
        self.register_buffer("old_prompts", old_prompts.to(embedding.device, embedding.dtype).clone())
        self.prompt = nn.Parameter(vocabulary_rows(embedding, length, generator))  # (P, d)
        self.mlp = ResidualPromptMLP(dim, mlp_hidden) if mlp_hidden else None

    @property
    def num_tasks(self) -> int:
        return self.old_prompts.shape[0] + 1

    def newest(self) -> torch.Tensor:
        """The newest task's prompt as the backbone sees it (after the MLP, if any): (P, d)."""
        return self.mlp(self.prompt) if self.mlp is not None else self.prompt

    def forward(self) -> torch.Tensor:
        """Every prompt, newest first, as one sequence: (t * P, d)."""
        old_newest_first = self.old_prompts.flip(0).to(self.prompt.dtype)
        return torch.cat([self.newest().unsqueeze(0), old_newest_first], dim=0).flatten(0, 1)

    def per_task(self) -> torch.Tensor:
        """(t, P, d), oldest first: what is saved, one block per task."""
        return torch.cat([self.old_prompts.to(self.prompt.dtype), self.newest().unsqueeze(0)], dim=0)


class ProgressivePromptModel(nn.Module):
    """A frozen backbone with the progressive prompt in front of every input, no task id."""

    def __init__(self, backbone: nn.Module, prompts: ProgressivePrompts, *, is_encoder_decoder: bool):
        super().__init__()
        self.backbone = backbone
        self.prompts = prompts
        self.is_encoder_decoder = is_encoder_decoder

    def _prompt(self, batch: int) -> torch.Tensor:
        prompt_Pd = self.prompts()  # called as a module, so that ZeRO-3 gathers the newest prompt
        return prompt_Pd.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, input_ids, attention_mask, labels=None):
        return self.backbone(**prompted_inputs(self.backbone, input_ids, attention_mask,
                                               self._prompt(input_ids.shape[0]), labels,
                                               is_encoder_decoder=self.is_encoder_decoder))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        return generate_prompted(self.backbone, input_ids, attention_mask, self._prompt(input_ids.shape[0]),
                                 is_encoder_decoder=self.is_encoder_decoder, **kwargs)
