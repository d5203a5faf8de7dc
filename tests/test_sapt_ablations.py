"""The ablation key: each variant changes exactly what the paper's Table 2 says it changes."""

import pytest
import torch

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.methods import build_method
from sapt.methods.base import Stage

PET = PetConfig(lora_r=4, lora_alpha=8)


@pytest.fixture
def two_block_model(tmp_path, tiny_t5_batch):
    return lambda ablation, **args: _two_block_model(ablation, tmp_path, tiny_t5_batch, **args)


def _two_block_model(ablation, tmp_path, batch, **args):
    """The model at task 2, after a first task whose weights were moved off their init."""
    method = build_method("sapt-lora", {"ablation": ablation, **args}, PET)
    backbone = load_backbone("embedded:tiny-t5")
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    with torch.no_grad():
        for p in first.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    first.eval()
    method.remember(first, 0, method.attention(first, batch).mean(dim=0))
    method.save(first, tmp_path)
    model = method.build(load_backbone("embedded:tiny-t5"), tmp_path, Stage(1, (1,), (0, 1)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return method, model, batch


@pytest.mark.parametrize("ablation, expected", [
    ("none", ("pseudo", "reflect")),
    ("no-arm", None),
    ("replay", ("real", "replay")),
    ("no-alignment", ("pseudo", "reflect")),
    ("no-sa", ("pseudo", "reflect")),
    ("real-inputs", ("real", "reflect")),
])
def test_what_each_ablation_remembers(ablation, expected):
    spec = build_method("sapt-lora", {"ablation": ablation}, PET).memory()
    assert (spec and (spec.source, spec.use)) == expected
    if spec is not None:
        assert spec.fraction == 0.02 and (spec.generator is not None) == (spec.source == "pseudo")
        assert spec.keeps_answers == (ablation == "replay")


def test_no_arm_adds_no_reflection_loss(two_block_model):
    method, model, batch = two_block_model("no-arm")
    reflect = {0: {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    loss, terms = method.loss(model, batch, reflect)
    assert set(terms) <= {"lm", "own_block_weight"} and float(loss.detach()) == pytest.approx(terms["lm"])


def test_no_sa_trains_the_newest_block_alone_and_selects_top1(two_block_model):
    method, model, batch = two_block_model("no-sa")
    assert method.targets == [[1.0]]  # a classifier's target, not a measured mean
    model.train()
    weights = model.block_weights(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert weights.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    reflect = {0: {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    loss, terms = method.loss(model, batch, reflect)
    assert terms["router_ce"] > 0
    loss.backward()
    assert model.router.new_key.grad.abs().sum() > 0
    model.eval()
    chosen = method.attention(model, batch)
    assert set(chosen.flatten().tolist()) <= {0.0, 1.0} and chosen.sum(dim=1).tolist() == [1.0, 1.0]


def test_no_alignment_selects_with_a_separate_selector(two_block_model, tmp_path):
    method, model, batch = two_block_model("no-alignment")
    assert model.selector is not None and model.selector is not model.router
    reflect = {0: {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    model.train()
    loss, terms = method.loss(model, batch, reflect)
    assert "selector_kl" in terms and "arm_kl" not in terms
    loss.backward()
    assert model.selector.new_key.grad.abs().sum() > 0
    model.eval()
    by_selector = method.attention(model, batch)
    by_router = model.router_log_weights(batch["input_ids"], batch["attention_mask"]).exp()
    assert not torch.allclose(by_selector, by_router)
    # The selector is saved and comes back at the next task.
    method.remember(model, 1, by_router.mean(dim=0))
    method.save(model, tmp_path / "two")
    assert (tmp_path / "two" / "selector" / "router.safetensors").is_file()
    third = method.build(load_backbone("embedded:tiny-t5"), tmp_path / "two", Stage(2, (2,), (0, 1, 2)))
    torch.testing.assert_close(third.selector.old_keys, model.selector.keys().detach())


def test_router_lr_puts_projection_and_keys_in_their_own_group(two_block_model):
    method, model, _ = two_block_model("none", router_lr=0.01)
    groups = method.param_groups(model, 0.003)
    assert [g["lr"] for g in groups] == [0.003, 0.01]
    router_ids = {id(p) for p in model.router.parameters()}
    assert all(id(p) in router_ids for p in groups[1]["params"])
    assert not any(id(p) in router_ids for p in groups[0]["params"])
    assert build_method("sapt-lora", {}, PET).param_groups(model, 0.003) is None
