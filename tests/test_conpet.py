"""ConPET's defining behaviour: the dynamic replay sampler draws earlier tasks uniformly whatever their
sizes (Static ConPET), and the selector of Dynamic ConPET picks each input's own expert."""

import random
from collections import Counter

import pytest
import torch

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.data.replay_mix import BalancedMix
from sapt.methods import build_method
from sapt.methods.base import MEMORY_KEY, TASK_KEY

PET = PetConfig(lora_r=4, lora_alpha=8)


def test_balanced_batches_draw_earlier_tasks_uniformly_not_by_size():
    memory = {0: [f"a{i}" for i in range(5)], 1: [f"b{i}" for i in range(50)], 2: [f"c{i}" for i in range(500)]}
    mix = BalancedMix(memory, batch_size=8, old_share=0.5, rng=random.Random(0))
    assert (mix.new_per_batch, mix.old_per_batch) == (4, 4)  # ConPET's 1:1 new:old
    draws = [pair for _ in range(1500) for pair in mix.draw_old()]
    by_task = Counter(task for task, _ in draws)
    for task in memory:
        assert abs(by_task[task] / len(draws) - 1 / 3) < 0.03, by_task  # sizes 5, 50, 500: still a third each
    assert all(item in memory[task] for task, item in draws)
    small = Counter(item for task, item in draws if task == 0)
    assert len(small) == 5  # every item of the small task comes up


def test_conpet_static_keeps_the_full_history_unless_capped():
    full = build_method("conpet-static", {}, PET).memory()
    capped = build_method("conpet-static", {"memory_per_task": 20}, PET).memory()
    assert (full.mix, full.old_share, full.count(400), full.keeps_answers) == ("balanced", 0.5, 400, True)
    assert (capped.count(400), capped.count(7)) == (20, 7)


@pytest.fixture(scope="module")
def embedded_tasks():
    return load_tasks(None, "embedded", max_train_per_task=96, max_eval_per_task=20, val_size=4, seed=0)


def test_the_selector_picks_the_right_expert_for_most_inputs_of_the_embedded_benchmark(embedded_tasks, tmp_path):
    """Four embedded tasks in-process, a few dozen steps each on balanced batches, as the workers train."""
    method = build_method("conpet-dynamic", {}, PET)
    state, memory = None, {}
    for stage in method.stages(len(embedded_tasks)):
        backbone = load_backbone("embedded:tiny-t5")
        collator = Collator(backbone.tokenizer, True, 64, 16)
        model = method.build(backbone, state, stage)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        task = stage.train_tasks[0]
        new = [(task, False, ex.source, ex.target) for ex in embedded_tasks[task].train]
        mix = BalancedMix(memory, batch_size=8, old_share=0.5, rng=random.Random(task)) if memory else None
        model.train()
        for step in range(20):
            count = mix.new_per_batch if mix else 8
            rows = [new[(step * count + i) % len(new)] for i in range(count)]
            rows += [(t, True, *item) for t, item in mix.draw_old()] if mix else []
            batch = collator.train_batch([r[2] for r in rows], [r[3] for r in rows])
            batch[TASK_KEY] = torch.tensor([r[0] for r in rows])
            batch[MEMORY_KEY] = torch.tensor([r[1] for r in rows])
            loss, terms = method.loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = tmp_path / f"stage{task}"
        method.save(model, state)
        memory[task] = [(ex.source, ex.target) for ex in embedded_tasks[task].train]
    finished = build_method("conpet-dynamic", {}, PET).load_finished(load_backbone("embedded:tiny-t5"), state)
    right = total = 0
    for index, task in enumerate(embedded_tasks):
        batch = collator.generation_batch([ex.source for ex in task.test])
        weights = method.attention(finished, batch)
        assert weights.shape == (len(task.test), len(embedded_tasks)) and torch.all(weights.sum(1) == 1)
        right += int((weights.argmax(1) == index).sum())
        total += len(task.test)
    print(f"selection accuracy {right / total:.3f}")
    assert right / total >= 0.8, right / total
