"""The SAPT pool and router: the subtle errors a re-implementation makes (sapt-method.md 1, 2.4)."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.methods import build_method
from sapt.methods.base import Stage
from sapt.pet import pool_files
from sapt.pet.lora_pool import PooledLoraLinear, Routing
from sapt.pet.prompt_pool import PromptPool
from sapt.pet.reflection import padded_target, reflection_kl
from sapt.pet.router import SharedAttention

PET = PetConfig(lora_r=4, lora_alpha=8)


def _random_pool(blocks: int, rank: int = 3, d_in: int = 12, d_out: int = 10):
    torch.manual_seed(0)
    routing = Routing()
    layer = PooledLoraLinear(nn.Linear(d_in, d_out), routing, rank=rank, alpha=6.0, dropout=0.0,
                             old_blocks=blocks - 1)
    old = [(torch.randn(rank, d_in), torch.randn(d_out, rank)) for _ in range(blocks - 1)]
    layer.load_old_blocks(old)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer, routing


@pytest.mark.parametrize("blocks", [1, 2, 7])
def test_pooled_layer_equals_the_explicit_sum_over_blocks(blocks):
    layer, routing = _random_pool(blocks)
    x = torch.randn(5, 4, 12)
    routing.weights = torch.softmax(torch.randn(5, blocks), dim=-1)
    expected = layer.base(x)
    for j in range(blocks):
        a, b = layer.block(j)
        expected = expected + routing.weights[:, j, None, None] * layer.scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_new_block_only_and_still_flows_through_old_blocks():
    layer, routing = _random_pool(3)
    x = torch.randn(2, 4, 12, requires_grad=True)
    routing.weights = torch.full((2, 3), 1 / 3)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad.abs().sum() > 0
    assert not layer.old_A.requires_grad and not layer.old_B.requires_grad
    # The input's gradient includes the old blocks' path (earlier layers' new blocks need it).
    x_only_new = x.detach().clone().requires_grad_(True)
    saved = layer.old_B.clone()
    layer.old_B.zero_()
    layer(x_only_new).square().sum().backward()
    layer.old_B.copy_(saved)
    assert not torch.allclose(x.grad, x_only_new.grad)


def test_prompt_pool_mixes_prompts_by_weight():
    torch.manual_seed(0)
    pool = PromptPool(torch.randn(50, 8), length=3, old_blocks=2, generator=torch.Generator().manual_seed(1))
    pool.load_old_blocks(torch.randn(2, 3, 8))
    weights = torch.softmax(torch.randn(4, 3), dim=-1)
    expected = sum(weights[:, j, None, None] * pool.prompts()[j] for j in range(3))
    torch.testing.assert_close(pool(weights), expected)


def test_masked_pooling_ignores_padding_unmasked_does_not():
    torch.manual_seed(0)
    tokens = torch.randn(1, 5, 16)
    padded = torch.cat([tokens, torch.full((1, 3, 16), 9.0)], dim=1)  # pad embeddings larger than any token
    mask = torch.tensor([[1] * 5 + [0] * 3])
    router = SharedAttention(16, hidden=4)
    router.old_keys = torch.randn(2, 16)
    short = router(tokens, torch.ones(1, 5))
    torch.testing.assert_close(router(padded, mask), short)
    unmasked = SharedAttention(16, hidden=4, masked_pooling=False)
    unmasked.old_keys = torch.zeros(2, 16)
    unmasked.load_state_dict(router.state_dict())
    assert not torch.allclose(unmasked(padded, mask), short)


def test_default_temperature_is_sqrt_of_the_embedding_size():
    assert SharedAttention(64).temperature == 8.0
    assert SharedAttention(64, temperature=2.0).temperature == 2.0


def test_kl_target_is_zero_padded_at_the_newer_blocks():
    stored = torch.tensor([0.2, 0.8])
    assert padded_target(stored, 4).tolist() == pytest.approx([0.2, 0.8, 0.0, 0.0])
    with pytest.raises(ValueError):
        padded_target(stored, 1)
    log_weights = torch.log_softmax(torch.tensor([[0.1, 0.5, 2.0, -1.0], [1.0, 0.0, 0.0, 0.0]]), dim=-1)
    target = padded_target(stored, 4)
    manual = sum(target[j] * (target[j].log() - log_weights[:, j]) for j in range(2)).mean()
    torch.testing.assert_close(reflection_kl(log_weights, target), manual)
    # The KL pushes weight off the newer blocks: moving mass there raises it.
    worse = torch.log_softmax(torch.tensor([[0.1, 0.5, 4.0, -1.0], [1.0, 0.0, 2.0, 0.0]]), dim=-1)
    assert reflection_kl(worse, target) > reflection_kl(log_weights, target)


# -- the method on the embedded tiny T5 ---------------------------------------------------------

def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)


def _finish_task(method, model, batch, task):
    """A stand-in for training a task: move every trainable weight, store the target, save."""
    _perturb([p for p in model.parameters() if p.requires_grad])
    model.eval()
    method.remember(model, task, method.attention(model, batch).mean(dim=0))


def _two_tasks(name, tmp_path, batch):
    """Method and model after two stand-in tasks; states saved in tmp_path/one and tmp_path/two."""
    method = build_method(name, {}, PET)
    first = method.build(load_backbone("embedded:tiny-t5"), None, Stage(0, (0,), (0,)))
    _finish_task(method, first, batch, 0)
    method.save(first, tmp_path / "one")
    second = method.build(load_backbone("embedded:tiny-t5"), tmp_path / "one", Stage(1, (1,), (0, 1)))
    _finish_task(method, second, batch, 1)
    method.save(second, tmp_path / "two")
    second.eval()
    return method, second


def test_one_block_equals_plain_peft_lora(tiny_t5_batch):
    backbone = load_backbone("embedded:tiny-t5")
    method = build_method("sapt-lora", {}, PET)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    layers = method.pooled_layers()
    _perturb([p for p in model.parameters() if p.requires_grad])
    batch = tiny_t5_batch
    model.eval()
    ours = model(**batch).loss

    reference = load_backbone("embedded:tiny-t5")
    peft_model = get_peft_model(reference.model, LoraConfig(r=4, lora_alpha=8, target_modules=reference.lora_targets,
                                                             task_type=TaskType.SEQ_2_SEQ_LM))
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    peft_model.eval()
    torch.testing.assert_close(ours, peft_model(**batch).loss)
    assert float(ours.detach()) != pytest.approx(float(load_backbone("embedded:tiny-t5").model(**batch).loss))


def test_second_task_trains_only_new_block_new_key_and_projection(tmp_path, tiny_t5_batch):
    backbone = load_backbone("embedded:tiny-t5")
    method = build_method("sapt-lora", {"kl_weight": 1.0}, PET)
    batch = tiny_t5_batch
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    _finish_task(method, first, batch, 0)
    method.save(first, tmp_path)
    saved_blocks = {n: tuple(t.clone() for t in layer.block(0)) for n, layer in method.pooled_layers().items()}

    model = method.build(load_backbone("embedded:tiny-t5"), tmp_path, Stage(1, (1,), (0, 1)))
    _perturb([p for p in model.parameters() if p.requires_grad])  # past step 0, where B = 0 starves A
    model.train()
    reflect = {0: {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    loss, terms = method.loss(model, batch, reflect)
    assert terms["arm_kl"] > 0
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert {"router.new_key", "router.projection.0.weight", "router.projection.1.weight"} <= trainable
    assert all(n.startswith("router.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    # Old block unchanged bit for bit after "training" the second task and saving it.
    _finish_task(method, model, batch, 1)
    method.save(model, tmp_path / "after2")
    for name, layer in method.pooled_layers().items():
        a, b = layer.block(0)
        assert torch.equal(a, saved_blocks[name][0]) and torch.equal(b, saved_blocks[name][1])
        assert not torch.equal(layer.block(1)[0], a)


def test_a_saved_block_is_a_peft_adapter_equal_to_the_pool_with_all_weight_on_it(tmp_path, tiny_t5_batch):
    batch = tiny_t5_batch
    _, second = _two_tasks("sapt-lora", tmp_path, batch)
    for block in (0, 1):
        weights = torch.zeros(2, 2)
        weights[:, block] = 1.0
        second.routing.weights = weights
        pool_loss = second.backbone(**batch).loss
        plain = PeftModel.from_pretrained(load_backbone("embedded:tiny-t5").model,
                                          str(pool_files.block_dir(tmp_path / "two", block)))
        plain.eval()
        torch.testing.assert_close(pool_loss, plain(**batch).loss)


def test_a_router_saved_for_another_backbone_size_is_refused(tmp_path, tiny_t5_batch):
    backbone = load_backbone("embedded:tiny-t5")
    method = build_method("sapt-lora", {}, PET)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    _finish_task(method, model, tiny_t5_batch, 0)
    method.save(model, tmp_path)
    other = build_method("sapt-lora", {"projection_dim": 7}, PET)
    with pytest.raises(Exception, match="hidden"):
        other.build(load_backbone("embedded:tiny-t5"), tmp_path, Stage(1, (1,), (0, 1)))


def test_sapt_prompt_builds_trains_the_prompt_and_generates(tiny_t5_batch):
    backbone = load_backbone("embedded:tiny-t5")
    method = build_method("sapt-prompt", {"prompt_length": 4}, PET)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prompts.prompt" in trainable and not any("lora" in n for n in trainable)
    batch = tiny_t5_batch
    loss, _ = method.loss(model, batch)
    loss.backward()
    assert model.prompts.prompt.grad.abs().sum() > 0
    model.eval()
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", ["sapt-lora", "sapt-prompt"])
def test_a_finished_state_loads_back_to_the_same_model(name, tmp_path, tiny_t5_batch):
    batch = tiny_t5_batch
    _, model = _two_tasks(name, tmp_path, batch)
    with torch.no_grad():
        expected = model(**batch)
    loaded = build_method(name, {}, PET).load_finished(load_backbone("embedded:tiny-t5"), tmp_path / "two")
    assert loaded.num_blocks == 2 and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        again = loaded(**batch)
    torch.testing.assert_close(again.weights, expected.weights)
    torch.testing.assert_close(again.loss, expected.loss)
    with pytest.raises(Exception, match="mid-task|not a"):
        build_method(name, {}, PET).load_finished(load_backbone("embedded:tiny-t5"), tmp_path)


def test_hand_written_pool_backward_matches_finite_differences():
    from sapt.pet.lora_pool import _PooledDelta

    torch.manual_seed(0)
    dbl = {"dtype": torch.double}
    x = torch.randn(2, 3, 6, **dbl, requires_grad=True)
    scale = torch.rand(2, 1, 8, **dbl, requires_grad=True)
    old_a, old_b = torch.randn(4, 6, **dbl), torch.randn(5, 4, **dbl)
    new_a = torch.randn(4, 6, **dbl, requires_grad=True)
    new_b = torch.randn(5, 4, **dbl, requires_grad=True)
    assert torch.autograd.gradcheck(_PooledDelta.apply, (x, scale, old_a, old_b, new_a, new_b))


def test_decoder_only_routes_on_the_prompt_alone_and_generates():
    from sapt.data.collate import Collator

    backbone = load_backbone("embedded:tiny-llama")
    collator = Collator(backbone.tokenizer, False, 64, 8)
    method = build_method("sapt-lora", {}, PET)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    method.remember(model, 0, torch.tensor([1.0]))
    prompts = ["which word comes first? red blue", "name the last one: green tea"]
    # Two blocks with a trained-looking router, so weights depend on the input.
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        method.save(model, Path(tmp))
        model = method.build(load_backbone("embedded:tiny-llama"), Path(tmp), Stage(1, (1,), (0, 1)))
    _perturb([p for p in model.parameters() if p.requires_grad])
    model.eval()
    short = collator.train_batch(prompts, ["red", "tea"])
    long = collator.train_batch(prompts, ["red red red red", "tea tea tea"])
    with torch.no_grad():
        w_short = model(**short).weights
        w_long = model(**long).weights
        w_prompt = model.block_weights(**collator.generation_batch(prompts))
    torch.testing.assert_close(w_short, w_long)  # answers are never part of the query
    torch.testing.assert_close(w_short, w_prompt)  # training and generation route alike
    out = model.generate(**collator.generation_batch(prompts), max_new_tokens=3, do_sample=False,
                         pad_token_id=collator.pad_id, eos_token_id=collator.eos_id)
    assert out.shape[0] == 2


def _queries_of(method, model, collator, sources):
    batch = collator.generation_batch(sources)
    return method.start_task_sums(model, {k: batch[k] for k in ("input_ids", "attention_mask")}), len(sources)


def test_key_init_points_the_new_key_at_the_new_tasks_inputs(tmp_path, tiny_t5_batch):
    """At task 2 the new key starts where the new task's queries lie, away from the remembered ones:
    a zero-initialised block gives the router no reason to go there by itself (docs/sapt.md)."""
    from sapt.data.collate import Collator
    from sapt.data.embedded import TASK_NAMES, build_task

    method = build_method("sapt-lora", {"key_init": "inputs"}, PET)
    backbone = load_backbone("embedded:tiny-t5")
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    collator = Collator.for_backbone(backbone, 64, 8, "auto")
    one, two = (build_task(n, num_train=0, num_val=0, num_test=40, seed=0) for n in TASK_NAMES[:2])
    old, new = _queries_of(method, first, collator, [e.source for e in one.test]), None
    assert method.start_task(first, *old, {}, 0) is None  # task 1: one key, nothing to aim
    _finish_task(method, first, tiny_t5_batch, 0)
    method.save(first, tmp_path)

    model = method.build(load_backbone("embedded:tiny-t5"), tmp_path, Stage(1, (1,), (0, 1))).eval()
    random_key = model.router.new_key.detach().clone()
    old, new = (_queries_of(method, model, collator, [e.source for e in task.test]) for task in (one, two))
    authors = build_method("sapt-lora", {"key_init": "random"}, PET)
    assert authors.start_task(model, *new, *old) is None and torch.equal(model.router.new_key, random_key)
    assert method.start_task(model, *new, {}, 0) is None  # nothing remembered (no-arm): the random key stays
    report = method.start_task(model, *new, *old)

    def new_block_weight(task):
        batch = collator.generation_batch([e.source for e in task.test])
        return float(model.block_weights(batch["input_ids"], batch["attention_mask"])[:, 1].mean())

    assert report["key_init"] == "inputs"
    assert float(model.router.new_key.detach().norm()) == pytest.approx((model.router.dim / 3) ** 0.5, rel=1e-4)
    assert new_block_weight(two) > 0.6 and new_block_weight(two) > new_block_weight(one) + 0.3


def test_router_warmup_leaves_the_router_still_while_the_new_block_learns(tmp_path, tiny_t5_batch):
    method = build_method("sapt-lora", {"router_warmup_steps": 1}, PET)
    batch = tiny_t5_batch
    first = method.build(load_backbone("embedded:tiny-t5"), None, Stage(0, (0,), (0,)))
    _finish_task(method, first, batch, 0)
    method.save(first, tmp_path)
    method = build_method("sapt-lora", {"router_warmup_steps": 1}, PET)  # a stage's fresh method: counts from 0
    model = method.build(load_backbone("embedded:tiny-t5"), tmp_path, Stage(1, (1,), (0, 1)))
    _perturb([p for p in model.parameters() if p.requires_grad])
    model.train()
    reflect = {0: {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    for step in range(2):
        model.zero_grad()
        loss, terms = method.loss(model, batch, reflect)
        loss.backward()
        router_grad = sum(float(p.grad.abs().sum()) for p in model.router.parameters() if p.grad is not None)
        block_grad = sum(float(layer.lora_B.grad.abs().sum()) for layer in method.pooled_layers().values())
        assert block_grad > 0
        if step == 0:
            assert router_grad == 0 and "arm_kl" not in terms
        else:
            assert router_grad > 0 and terms["arm_kl"] > 0


def _new_block_weight_after_a_step(tmp_path, batch, own_block_weight: float) -> tuple[float, float]:
    """Task 2 (ARM on) from a fixed start, one SGD step: its inputs' weight on their own block, before and after."""
    torch.manual_seed(0)
    method = build_method("sapt-lora", {"own_block_weight": own_block_weight}, PET)
    first = method.build(load_backbone("embedded:tiny-t5"), None, Stage(0, (0,), (0,)))
    _finish_task(method, first, batch, 0)
    method.save(first, tmp_path)
    model = method.build(load_backbone("embedded:tiny-t5"), tmp_path, Stage(1, (1,), (0, 1)))
    own = lambda: float(method.attention(model, batch)[:, -1].mean())  # noqa: E731
    model.eval()
    before = own()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    reflect = {0: {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    model.train()
    loss, terms = method.loss(model, batch, reflect)
    if own_block_weight > 0:  # mean of -log(new block's weight) >= -log(its mean weight) (Jensen)
        assert terms["own_block_ce"] >= -math.log(terms["own_block_weight"]) - 1e-6
    else:
        assert "own_block_ce" not in terms
    loss.backward()
    optimizer.step()
    model.eval()
    return before, own()


def test_own_block_weight_pulls_the_new_tasks_inputs_onto_its_block(tmp_path, tiny_t5_batch):
    # The same task 2 from the same start, one step: the larger mu, the more of its inputs' weight their
    # new block holds after it (ARM's target for these very inputs is block 1, and pulls the other way).
    steps = {mu: _new_block_weight_after_a_step(tmp_path / str(mu), tiny_t5_batch, mu) for mu in (0.0, 0.5, 1.0)}
    assert len({round(before, 6) for before, _ in steps.values()}) == 1
    assert steps[0.0][1] < steps[0.5][1] < steps[1.0][1]


def _three_tasks_inputs():
    """tiny-t5 and the test prompts of three embedded tasks: their sources and model-input batches."""
    from sapt.data.collate import Collator
    from sapt.data.embedded import TASK_NAMES, build_task

    backbone = load_backbone("embedded:tiny-t5")
    collator = Collator.for_backbone(backbone, 64, 8, "auto")
    sources = [[e.source for e in build_task(n, num_train=0, num_val=0, num_test=40, seed=0).test] for n in TASK_NAMES[:3]]
    batches = [{k: v for k, v in collator.generation_batch(s).items() if k in ("input_ids", "attention_mask")}
               for s in sources]
    return backbone, sources, batches


def test_query_center_is_the_midpoint_of_the_first_two_tasks_and_travels_with_the_router(tmp_path, tiny_t5_batch):
    """The pooled embeddings of all tasks share most of their direction; query_center first-tasks
    subtracts the midpoint of tasks 1 and 2 (task 1's post-task pass, task 2's start-of-task pass),
    saved with the router and never moved after."""
    backbone, sources, batches = _three_tasks_inputs()
    method = build_method("sapt-lora", {"query_center": "first-tasks"}, PET)
    assert method.start_task_pass and not build_method("sapt-lora", {}, PET).start_task_pass
    first = method.build(backbone, None, Stage(0, (0,), (0,))).eval()
    mean_pooled = [first.pooled_embeddings(**b).mean(dim=0) for b in batches]
    report = method.finish_task(first, 0, method.post_task_sums(first, batches[0], None), len(sources[0]))
    assert torch.allclose(first.router.center, mean_pooled[0], atol=1e-5)
    assert report["query_center_norm"] == pytest.approx(float(mean_pooled[0].norm()), rel=1e-3)
    method.save(first, tmp_path / "one")

    second = method.build(load_backbone("embedded:tiny-t5"), tmp_path / "one", Stage(1, (1,), (0, 1))).eval()
    assert torch.equal(second.router.center, first.router.center)  # loaded with the router
    method.start_task(second, method.start_task_sums(second, batches[1]), len(sources[1]), {}, 0)
    midpoint = (mean_pooled[0] + mean_pooled[1]) / 2
    assert torch.allclose(second.router.center, midpoint, atol=1e-5)

    def task_means_cosine(model):
        means = [model.queries(**b).mean(0) for b in batches[:2]]
        return float(torch.nn.functional.cosine_similarity(*means, dim=0))

    plain = build_method("sapt-lora", {}, PET).build(load_backbone("embedded:tiny-t5"), None, Stage(0, (0,), (0,))).eval()
    plain.router.projection.load_state_dict(second.router.projection.state_dict())
    assert task_means_cosine(second) < task_means_cosine(plain) - 0.5, (task_means_cosine(second), task_means_cosine(plain))

    _finish_task(method, second, batches[1], 1)
    method.save(second, tmp_path / "two")
    third = method.build(load_backbone("embedded:tiny-t5"), tmp_path / "two", Stage(2, (2,), (0, 1, 2))).eval()
    assert method.start_task(third, method.start_task_sums(third, batches[2]), len(sources[2]), {}, 0) is None
    assert torch.allclose(third.router.center, midpoint, atol=1e-5)  # fixed from task 2 on


def test_stream_query_center_is_the_mean_of_every_task_mean_so_far(tmp_path, tiny_t5_batch):
    """query_center stream moves the center at each task's start to the mean of the task means seen
    so far, so the first tasks do not stay at the center (first-tasks left them there: forgotten)."""
    backbone, sources, batches = _three_tasks_inputs()
    method = build_method("sapt-lora", {"query_center": "stream"}, PET)
    model = method.build(backbone, None, Stage(0, (0,), (0,))).eval()
    mean_pooled = [model.pooled_embeddings(**b).mean(dim=0) for b in batches]
    method.finish_task(model, 0, method.post_task_sums(model, batches[0], None), len(sources[0]))
    for task in (1, 2):
        method.save(model, tmp_path / str(task))
        model = method.build(load_backbone("embedded:tiny-t5"), tmp_path / str(task),
                             Stage(task, (task,), tuple(range(task + 1)))).eval()
        report = method.start_task(model, method.start_task_sums(model, batches[task]), len(sources[task]), {}, 0)
        expected = torch.stack(mean_pooled[:task + 1]).mean(dim=0)
        assert torch.allclose(model.router.center, expected, atol=1e-5), task
        assert report["query_center_norm"] == pytest.approx(float(expected.norm()), rel=1e-3)
        assert "pooled" not in method.post_task_sums(model, batches[task], None)  # only task 1's post pass pools
        _finish_task(method, model, batches[task], task)
