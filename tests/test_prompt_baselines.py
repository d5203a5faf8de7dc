"""The prompt baselines' defining behaviour (baselines.md 3), on both backbone families, in-process:

- ProgPrompt: the input the backbone sees grows by exactly ``prompt_length`` positions per task,
  earlier prompts stay bit-identical through later tasks (residual MLP on), and the newest prompt
  comes first.
- L2P: training pulls the selected keys toward their queries, and an input selects the same prompts
  in training (dropout on) as at test time.
"""

import pytest
import torch
from torch import nn

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.methods import build_method
from sapt.methods.base import Stage
from method_steps import train_steps
from sapt.pet.soft_prompt import load_prompts

PET = PetConfig(lora_r=4, lora_alpha=8)
BACKBONES = ["embedded:tiny-t5", "embedded:tiny-llama"]


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(None, "embedded", max_train_per_task=48, max_eval_per_task=8, val_size=4, seed=0)[:3]


def _collator(backbone):
    return Collator(backbone.tokenizer, backbone.is_encoder_decoder, 64, 16)


def _positions_added(backbone, model, batch) -> int:
    """How many positions beyond its tokens the backbone's input has when ``model`` generates."""
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.append(kwargs["inputs_embeds"].shape[1])

    first = backbone.model.get_encoder() if backbone.is_encoder_decoder else backbone.model  # reads the embeddings
    handle = first.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=2)
    finally:
        handle.remove()
    return seen[0] - batch["input_ids"].shape[1]


# -- ProgPrompt ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_progprompt_grows_the_input_by_one_prompt_per_task_and_freezes_earlier_prompts(name, tasks, tmp_path):
    method = build_method("prog-prompt", {"prompt_length": 10, "residual_mlp": True, "mlp_hidden": 16}, PET)
    state, grown, saved = None, [], []
    for row in range(3):
        backbone = load_backbone(name)
        collator = _collator(backbone)
        model = method.build(backbone, state, Stage(row, (row,), tuple(range(row + 1))))
        train_steps(method, model, collator, tasks[row].train, 4, lr=5e-2, seed=row)
        batch = collator.generation_batch([ex.source for ex in tasks[0].test])
        grown.append(_positions_added(backbone, model, batch))
        state = tmp_path / f"stage{row}"
        method.save(model, state)
        dim = backbone.model.get_input_embeddings().weight.shape[1]
        saved.append(load_prompts([state / "blocks" / f"block-{i:03d}" for i in range(row + 1)], 10, dim))
    assert grown == [10, 20, 30]
    # the first task's prompt, as saved after task 1 (after its MLP), is bit-identical after tasks 2 and 3
    assert torch.equal(saved[0][0], saved[1][0]) and torch.equal(saved[0][0], saved[2][0])
    assert torch.equal(saved[1][1], saved[2][1])
    # what the backbone sees is newest first: [P_3; P_2; P_1]
    final = method.load_finished(load_backbone(name), state)
    torch.testing.assert_close(final.prompts().detach().float(), saved[2].flip(0).flatten(0, 1))


def test_progprompt_trains_only_the_newest_prompt(tasks, tmp_path):
    method = build_method("prog-prompt", {"prompt_length": 4}, PET)
    backbone = load_backbone("embedded:tiny-t5")
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    train_steps(method, first, _collator(backbone), tasks[0].train, 2)
    method.save(first, tmp_path / "one")
    second = method.build(load_backbone("embedded:tiny-t5"), tmp_path / "one", Stage(1, (1,), (0, 1)))
    trainable = [n for n, p in second.named_parameters() if p.requires_grad]
    assert trainable == ["prompts.prompt"]
    assert second.prompts.old_prompts.shape == (1, 4, 128) and not second.prompts.old_prompts.requires_grad


# -- L2P ----------------------------------------------------------------------------------------

def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _mean_selected_cosine(model, batch) -> float:
    with torch.no_grad():
        query = model.query(batch["input_ids"], batch["attention_mask"])
        cos = model.pool.similarity(query)
        return float(cos.gather(1, cos.topk(model.pool.top_n, dim=-1).indices).mean())


@pytest.mark.parametrize("name", BACKBONES)
def test_l2p_pulls_the_selected_keys_toward_their_queries(name, tasks):
    backbone = load_backbone(name)
    collator = _collator(backbone)
    batch = collator.generation_batch([ex.source for ex in tasks[0].train[:32]])

    def after_training(pull_weight):
        method = build_method("l2p", {"pool_size": 6, "top_n": 2, "prompt_length": 3, "pull_weight": pull_weight}, PET)
        model = method.build(load_backbone(name), None, Stage(0, (0,), (0,)))
        before = _mean_selected_cosine(model, batch)
        terms = train_steps(method, model, collator, tasks[0].train, 12, lr=5e-2)
        return before, _mean_selected_cosine(model, batch), terms

    before, after, terms = after_training(0.1)
    _, after_without, _ = after_training(0.0)
    assert after > before + 0.2, (before, after)  # the pull term moves the chosen keys to the queries
    assert after_without == pytest.approx(before, abs=1e-6)  # and nothing else moves the keys
    assert terms["pull"] == pytest.approx(2 * (1 - after), abs=0.15)  # the logged term is sum (1 - cos)


@pytest.mark.parametrize("name", BACKBONES)
def test_l2p_selects_the_same_prompts_in_training_and_at_test(name, tasks):
    method = build_method("l2p", {"pool_size": 8, "top_n": 3, "prompt_length": 2}, PET)
    backbone = load_backbone(name)
    collator = _collator(backbone)
    model = method.build(backbone, None, Stage(0, (0,), (0,)))
    train_steps(method, model, collator, tasks[0].train, 3)
    _set_dropout(model, 0.3)  # the embedded backbones have none: the query must not depend on it
    examples = [ex for task in tasks for ex in task.train[:6]]
    model.train()
    trained = model(**collator.train_batch([ex.source for ex in examples], [ex.target for ex in examples])).selected
    model.eval()
    tested = model.select(**collator.generation_batch([ex.source for ex in examples]))
    assert torch.equal(trained, tested)
    assert len({tuple(row.tolist()) for row in tested}) > 1  # not one selection for every input


def test_l2p_refuses_more_selected_prompts_than_the_pool_holds():
    from sapt.errors import SaptError

    with pytest.raises(SaptError, match=r"method_args.top_n: Value error, 6 is more than pool_size \(5\)"):
        build_method("l2p", {"pool_size": 5, "top_n": 6}, PET)
