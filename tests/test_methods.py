"""Every method on the embedded tiny backbone: stages, trainable parameters, state carried between stages."""

import pytest
import torch

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.methods import METHODS, build_method
from sapt.errors import SaptError

PET = PetConfig(lora_r=4, lora_alpha=8)

# method -> (stages for 3 tasks as (row, train_tasks, eval_tasks, fresh))
EXPECTED_STAGES = {
    "seq-lora": [(0, (0,), (0,), False), (1, (1,), (0, 1), False), (2, (2,), (0, 1, 2), False)],
    "single": [(0, (0,), (0,), True), (1, (1,), (1,), True), (2, (2,), (2,), True)],
    "multitask": [(2, (0, 1, 2), (0, 1, 2), True)],
    "sapt-lora": [(0, (0,), (0,), False), (1, (1,), (0, 1), False), (2, (2,), (0, 1, 2), False)],
    "sapt-prompt": [(0, (0,), (0,), False), (1, (1,), (0, 1), False), (2, (2,), (0, 1, 2), False)],
}
PLAIN_LORA = ["multitask", "seq-lora", "single"]  # SAPT's pool has tests of its own (test_sapt_pool.py)


def test_the_table_covers_every_method():
    assert set(EXPECTED_STAGES) == set(METHODS)


@pytest.mark.parametrize("name", sorted(EXPECTED_STAGES))
def test_stages(name):
    stages = build_method(name, {}, PET).stages(3)
    assert [(s.row, s.train_tasks, s.eval_tasks, s.fresh) for s in stages] == EXPECTED_STAGES[name]


def test_unknown_method_args_are_rejected():
    with pytest.raises(SaptError, match="method_args"):
        build_method("seq-lora", {"lambda": 1}, PET)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", PLAIN_LORA)
def test_only_lora_trains_and_state_carries_over(name, tmp_path):
    method = build_method(name, {}, PET)
    first, second = method.stages(2)[0], method.stages(2)[-1]
    model = method.build(load_backbone("embedded:tiny-t5"), None, first)
    trainable = _trainable(model)
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():  # stand-in for training: move every LoRA weight
        for p in trainable.values():
            p.add_(0.5)
    method.save(model, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])

    rebuilt = method.build(load_backbone("embedded:tiny-t5"), tmp_path, second)
    carried = all(torch.equal(p, trainable[n]) for n, p in _trainable(rebuilt).items())
    # A sequential method continues from the saved block; a fresh stage starts a new one.
    assert carried == (not second.fresh)
    assert _trainable(rebuilt)
