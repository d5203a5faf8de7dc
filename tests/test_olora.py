"""O-LoRA's defining behaviour: the orthogonality loss pushes the new LoRA's A out of the old ones'
row space, and the test-time model is the plain sum of every task's LoRA (baselines.md 2)."""

import pytest
import torch
from peft import PeftModel

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.methods import build_method
from sapt.methods.base import Stage
from method_steps import train_steps

BACKBONE = "embedded:tiny-t5"
PET = PetConfig(lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(None, "embedded", max_train_per_task=64, max_eval_per_task=4, val_size=4, seed=0)[:2]


def _overlap(layers) -> float:
    return float(sum((layer.old_A @ layer.lora_A.detach().T).abs().sum() for layer in layers.values()))


def _second_task(tasks, tmp_path, lambda_1):
    """Task 1 trained (same seed for every lambda), then 40 steps of task 2; returns the overlap before and after."""
    method = build_method("o-lora", {"lambda_1": lambda_1}, PET)
    backbone = load_backbone(BACKBONE)
    collator = Collator(backbone.tokenizer, True, 64, 16)
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    train_steps(method, first, collator, tasks[0].train, 20, seed=0)
    method.save(first, tmp_path / "one")
    second = method.build(load_backbone(BACKBONE), tmp_path / "one", Stage(1, (1,), (0, 1)))
    layers = method.pooled_layers()
    before = _overlap(layers)
    terms = train_steps(method, second, collator, tasks[1].train, 40, seed=1)
    return before, _overlap(layers), terms


def test_the_orthogonality_loss_drives_the_overlap_down(tasks, tmp_path):
    before, after, terms = _second_task(tasks, tmp_path / "olora", lambda_1=0.5)
    _, after_without, _ = _second_task(tasks, tmp_path / "inc", lambda_1=0.0)
    assert after < 0.5 * before  # the new A leaves the old rows' span
    assert after < 0.5 * after_without  # and it is the loss that does it (IncLoRA keeps its overlap)
    assert terms["orthogonality"] == pytest.approx(after, rel=0.2)  # the logged term is that overlap


def test_the_first_task_has_no_overlap_term(tasks):
    method = build_method("o-lora", {}, PET)
    backbone = load_backbone(BACKBONE)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    collator = Collator(backbone.tokenizer, True, 64, 16)
    terms = train_steps(method, model, collator, tasks[0].train, 1, seed=0)
    assert terms["orthogonality"] == 0.0 and terms["l2"] > 0


def test_the_test_time_model_is_the_sum_of_every_task_lora(tasks, tmp_path):
    """Against PEFT: merging each saved block into the weights in turn gives the same logits."""
    method = build_method("o-lora", {}, PET)
    backbone = load_backbone(BACKBONE)
    collator = Collator(backbone.tokenizer, True, 64, 16)
    state = None
    for row in range(2):
        model = method.build(load_backbone(BACKBONE) if row else backbone, state, Stage(row, (row,), tuple(range(row + 1))))
        train_steps(method, model, collator, tasks[row].train, 10, seed=row)
        state = tmp_path / f"stage{row}"
        method.save(model, state)
    finished = method.load_finished(load_backbone(BACKBONE), state)
    merged = load_backbone(BACKBONE).model
    for block in method.finished_files(state, 1).blocks:
        merged = PeftModel.from_pretrained(merged, str(state / block)).merge_and_unload()
    batch = collator.train_batch([ex.source for ex in tasks[1].test], [ex.target for ex in tasks[1].test])
    with torch.no_grad():
        ours = finished(**batch).logits
        theirs = merged(**batch).logits
        bare = load_backbone(BACKBONE).model(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - bare).abs().max() > 1e-2  # the blocks do change the model
