"""LFPT5's defining behaviour (baselines.md 3), in-process on both backbone families: the generator's
items are the whole example behind the task's token; after training on a task, the prompt's pseudo
samples parse into input and output; the KD term is zero at the first step of a task (the prompt
still equals its snapshot) and grows as the prompt moves; nothing but the prompt and the new
task's token trains."""

import pytest
import torch

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.methods import build_method
from sapt.methods.base import MEMORY_KEY, TASK_KEY, Stage
from sapt.methods.lfpt5 import split_at_mark
from sapt.pet.generative_prompt import ANSWER_MARK

PET = PetConfig(lora_r=4, lora_alpha=8)
BACKBONES = ["embedded:tiny-t5", "embedded:tiny-llama"]
ARGS = {"prompt_length": 100, "max_new_tokens": 40}


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(None, "embedded", max_train_per_task=64, max_eval_per_task=8, val_size=4, seed=0)[:2]


def _batch(collator, new, task, remembered=()):
    """A training batch as the workers hand it: the new task's items, then remembered items of task 0."""
    rows = list(new) + list(remembered)
    batch = collator.train_batch([e.source for e in rows], [e.target for e in rows])
    batch[TASK_KEY] = torch.tensor([task] * len(new) + [0] * len(remembered))
    batch[MEMORY_KEY] = torch.tensor([False] * len(new) + [True] * len(remembered))
    return batch


def _train(method, model, collator, examples, task, steps, lr=0.1, memory=()):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    model.train()
    terms = []
    for step in range(steps):
        rows = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        loss, logged = method.loss(model, _batch(collator, rows, task, memory[:4]))
        terms.append(logged)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return terms


@pytest.mark.parametrize("name", BACKBONES)
def test_the_generators_items_are_the_whole_example_behind_the_tasks_token(name, tasks):
    backbone = load_backbone(name)
    method = build_method("lfpt5", ARGS, PET)
    method.build(backbone, None, Stage(0, (0,), (0,)))
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, 64, 16)
    examples = tasks[0].train[:3]
    generation = method.generation_batch(collator.train_batch([e.source for e in examples], [e.target for e in examples]))
    tokenizer = backbone.tokenizer
    mark = tokenizer(f" {ANSWER_MARK} ", add_special_tokens=False)["input_ids"]
    for row, example in zip(generation["labels"], examples):
        ids = [int(i) for i in row if i != -100]
        source, target = split_at_mark(ids, mark)
        assert tokenizer.decode(source, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(example.source, add_special_tokens=False)["input_ids"])
        assert tokenizer.decode(target, skip_special_tokens=True) == example.target
    if backbone.is_encoder_decoder:
        assert generation["input_ids"].shape[1] == 0  # the encoder reads the prompt and the task token only


def test_after_a_task_the_prompts_pseudo_samples_parse_into_input_and_output(tasks):
    # on tiny-t5 only: a decoder-only backbone scores every prompt position, 6x the time here
    backbone = load_backbone("embedded:tiny-t5")
    # top-k 8, not the official 64: the embedded backbones are tiny, and their tails are noise
    method = build_method("lfpt5", {**ARGS, "lm_weight": 1.0, "top_k": 8}, PET)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, 64, 16)
    torch.manual_seed(0)
    _train(method, model, collator, tasks[0].train, 0, steps=150, lr=0.3)
    written = method.sample_memory(model, collator, 0, 24, seed=1)
    assert len(written) > 0.5 * 24, written[:3]  # most samples parse into input and output
    instruction = backbone.tokenizer.decode(backbone.tokenizer(tasks[0].instruction, add_special_tokens=False)["input_ids"])
    assert sum(item["source"].startswith(instruction) for item in written) > 0.5 * len(written), written[:3]


@pytest.mark.parametrize("name", BACKBONES)
def test_the_kd_term_is_zero_at_the_first_step_of_a_task_and_grows_after(name, tasks, tmp_path):
    backbone = load_backbone(name)
    method = build_method("lfpt5", ARGS, PET)
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, 64, 16)
    assert all(t["kd"] == 0.0 for t in _train(method, first, collator, tasks[0].train, 0, steps=3))  # no snapshot yet
    method.save(first, tmp_path / "one")
    second = method.build(load_backbone(name), tmp_path / "one", Stage(1, (1,), (0, 1)))
    assert [n for n, p in second.named_parameters() if p.requires_grad] == ["bank.prompt", "bank.new_token"]
    terms = _train(method, second, collator, tasks[1].train, 1, steps=6, memory=tasks[0].train)
    assert terms[0]["kd"] == 0.0  # the prompt starts as its snapshot
    assert terms[-1]["kd"] > 1e-4, terms  # and moves away from it
    torch.testing.assert_close(second.bank.snapshot, first.bank.prompt.detach())


def test_every_batch_of_a_later_task_runs_the_snapshot_with_or_without_remembered_items(tasks, tmp_path):
    # Under ZeRO-3 a forward is a collective call: a rank whose batch holds no remembered item must
    # still run the snapshot's pass that another rank's batch needs, or the ranks hang.
    backbone = load_backbone("embedded:tiny-t5")
    method = build_method("lfpt5", ARGS, PET)
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, 64, 16)
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    method.save(first, tmp_path / "one")
    second = method.build(load_backbone("embedded:tiny-t5"), tmp_path / "one", Stage(1, (1,), (0, 1)))
    passes = []
    second.register_forward_pre_hook(lambda module, args, kwargs: passes.append(kwargs.get("old", False)),
                                      with_kwargs=True)
    rows = tasks[1].train[:4]
    for remembered in ((), tasks[0].train[:2]):
        passes.clear()
        loss, terms = method.loss(second, _batch(collator, rows, 1, remembered))
        assert passes.count(True) == 1, passes  # one snapshot pass, remembered items or none
        assert len(passes) == 3  # solver, generator, snapshot
    assert terms["kd"] == 0.0  # the snapshot still equals the prompt
