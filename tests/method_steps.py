"""In-process training steps for the method tests: a method's own loss on one task's items, in order."""

import torch


def train_steps(method, model, collator, examples, steps: int, *, lr: float = 1e-2, seed: int = 0) -> dict:
    """``steps`` AdamW steps on batches of 8 of ``examples`` (cycled); leaves the model in eval mode.
    Returns the extra loss terms the method logged at the last step."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    model.train()
    terms = {}
    for step in range(steps):
        rows = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        loss, terms = method.loss(model, collator.train_batch([r.source for r in rows], [r.target for r in rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return terms
