"""A decoder-only backbone computes its vocabulary head only from the position before the first answer
token on, with the same loss and gradients as over the whole sequence."""

import pytest
import torch

from sapt.backbones import load_backbone
from sapt.data.collate import Collator
from sapt.data.templates import long_sequence_prompt


@pytest.mark.parametrize("name", ["embedded:tiny-llama", "embedded:smollm2-135m"])
def test_the_loss_and_its_gradient_are_the_whole_sequences_with_a_fraction_of_the_logits(name):
    backbone = load_backbone(name)
    model = backbone.model
    collator = Collator(backbone.tokenizer, False, max_source_len=64, max_target_len=6)
    sources = [long_sequence_prompt("Name the first word.", " ".join(["apple", "pear", "plum"][: k + 1] * (k + 2)))
               for k in range(3)]
    batch = collator.train_batch(sources, ["apple", "pear plum", "plum"])
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    try:
        results = []
        for extra in ({}, {"logits_to_keep": 0}):  # the hook's cut, then every position (the caller's choice)
            embeddings.grad = None
            out = model(**batch, **extra)
            out.loss.backward()
            results.append((out.logits.shape[1], out.loss.detach(), embeddings.grad.clone()))
    finally:
        embeddings.requires_grad_(False)
        embeddings.grad = None
    (kept, loss, grad), (whole, whole_loss, whole_grad) = results
    first_answer = int((batch["labels"] != -100).any(0).nonzero()[0])
    assert whole == batch["input_ids"].shape[1] and kept == whole - first_answer + 1 < whole / 2
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-5)  # float sums in another order
