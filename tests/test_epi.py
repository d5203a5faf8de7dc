"""EPI's defining behaviour (baselines.md 3): its task statistics are the class means and the
covariance of each task's prefix-free features, summed over any split of the items; an input goes
to the task whose nearest class mean is closest in Mahalanobis distance; on the embedded
benchmark's test inputs that identifies the task; only the picked task's prefix answers; a task
without a label set is refused (tests/test_cli.py has the run-level refusal)."""

import pytest
import torch

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.errors import SaptError
from sapt.methods import build_method
from sapt.methods.base import Stage, TaskInfo, task_infos
from sapt.pet.task_gaussians import TaskGaussians

PET = PetConfig(lora_r=4, lora_alpha=8)


def test_the_statistics_are_each_tasks_class_means_and_covariance_whatever_the_batches():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(50, 6, generator=generator) * torch.tensor([3.0, 1, 1, 0.5, 2, 1])
    classes = torch.randint(0, 3, (50,), generator=generator)
    gaussians = TaskGaussians(6)
    parts = [TaskGaussians.batch_sums(features[a:b], classes[a:b], 4) for a, b in ((0, 7), (7, 31), (31, 50))]
    gaussians.add_task({k: sum(p[k] for p in parts) for k in parts[0]}, 50)  # as the workers' all-reduce adds them
    for c in range(3):
        torch.testing.assert_close(gaussians.class_means[c], features[classes == c].mean(0))
    torch.testing.assert_close(gaussians.class_means[3], features.mean(0))  # a class never seen: the task mean
    torch.testing.assert_close(gaussians.covariance_sum, torch.cov(features.T), rtol=1e-4, atol=1e-5)
    second = torch.randn(40, 6, generator=generator)
    gaussians.add_task(TaskGaussians.batch_sums(second, torch.zeros(40, dtype=torch.long), 1), 40)
    shared = (torch.cov(features.T) + torch.cov(second.T)) / 2  # the running average of the tasks' covariances
    torch.testing.assert_close(gaussians.precision, torch.linalg.pinv(shared, hermitian=True), rtol=1e-3, atol=1e-4)
    assert gaussians.class_task.tolist() == [0, 0, 0, 0, 1]


def test_an_input_goes_to_the_task_of_its_nearest_class_mean_in_mahalanobis_distance():
    gaussians = TaskGaussians(2)
    # task 0: two classes far apart on the wide axis; task 1: one class near the middle
    gaussians.class_means = torch.tensor([[-8.0, 0.0], [8.0, 0.0], [0.0, 0.8]])
    gaussians.class_task = torch.tensor([0, 0, 1])
    gaussians.precision = torch.linalg.inv(torch.diag(torch.tensor([100.0, 1.0])))
    queries = torch.tensor([[8.0, 0.5],    # next to task 0's second class (task 0's mean would say task 1)
                            [0.0, 1.0],    # next to task 1
                            [3.0, 0.6]])   # Euclid: task 1 (3.0 away vs 5.0); Mahalanobis: task 1 as well
    assert gaussians.select(queries).tolist() == [0, 1, 1]
    # along the wide axis 6 units are closer than 1.5 across it: Mahalanobis, not Euclid
    gaussians.class_means = torch.tensor([[6.0, 0.0], [0.0, 1.5]])
    gaussians.class_task = torch.tensor([0, 1])
    assert gaussians.select(torch.zeros(1, 2)).tolist() == [0]


def _through_the_sequence(name, tasks, root):
    """Every stage as the workers run it, without training steps (the statistics do not depend on
    them): build from the previous state, the post-task pass over the task's training items, save."""
    method = build_method("epi", {"prefix_length": 4}, PET)
    method.set_tasks(task_infos(tasks))
    state = None
    for row in range(len(tasks)):
        backbone = load_backbone(name)
        collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, 64, 16)
        model = method.build(backbone, state, Stage(row, (row,), tuple(range(row + 1)))).eval()
        examples = tasks[row].train
        sums = None
        for start in range(0, len(examples), 32):
            chunk = examples[start:start + 32]
            part = method.post_task_sums(model, collator.generation_batch([e.source for e in chunk]),
                                         [e.target for e in chunk])
            sums = part if sums is None else {k: sums[k] + part[k] for k in part}
        method.finish_task(model, row, {k: v.float() for k, v in sums.items()}, len(examples))
        state = root / f"stage{row}"
        method.save(model, state)
    return method, method.load_finished(load_backbone(name), state), collator


@pytest.mark.parametrize("name", ["embedded:tiny-t5", "embedded:tiny-llama"])
def test_epi_identifies_the_task_of_the_embedded_benchmarks_test_inputs(name, tmp_path):
    tasks = load_tasks(None, "embedded", max_train_per_task=120, max_eval_per_task=50, val_size=8, seed=42)
    method, model, collator = _through_the_sequence(name, tasks, tmp_path)
    correct = 0
    for index, task in enumerate(tasks):
        weights = method.attention(model, collator.generation_batch([e.source for e in task.test]))
        assert weights.shape == (len(task.test), len(tasks)) and set(weights.sum(1).tolist()) == {1.0}
        correct += int((weights.argmax(1) == index).sum())
    accuracy = correct / sum(len(t.test) for t in tasks)
    assert accuracy >= 0.95, accuracy  # 1.0 on both backbones when written
    # the registry's state version (the statistics alone on the bare backbone) identifies alike
    shared = method.load_shared(load_backbone(name), tmp_path / f"stage{len(tasks) - 1}", len(tasks))
    batch = collator.generation_batch([e.source for t in tasks for e in t.test])
    torch.testing.assert_close(method.attention(shared, batch), method.attention(model, batch))


@pytest.mark.parametrize("name", ["embedded:tiny-t5", "embedded:tiny-llama"])
def test_only_the_picked_tasks_prefix_answers(name, tmp_path):
    tasks = load_tasks(None, "embedded", max_train_per_task=40, max_eval_per_task=6, val_size=4, seed=0)[:2]
    method, model, collator = _through_the_sequence(name, tasks, tmp_path)
    inputs = [e.source for t in tasks for e in t.test]
    batch = collator.generation_batch(inputs)
    picked = model.select(batch["input_ids"], batch["attention_mask"])
    assert sorted(set(picked.tolist())) == [0, 1]  # a mixed batch
    with torch.no_grad():
        torch.nn.init.normal_(model.peft.prompt_encoder["block-001"].embedding.weight, std=5.0)  # task 2's prefix only
        mixed = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=collator.pad_id)
    first = picked == 0
    fresh = method.load_finished(load_backbone(name), tmp_path / "stage1")
    with torch.no_grad():
        alone = fresh.generate(**{k: v[first] for k, v in batch.items()}, max_new_tokens=4, do_sample=False,
                               pad_token_id=collator.pad_id)
    # the inputs given task 1 answer exactly as without task 2's (changed) prefix in the batch
    assert torch.equal(mixed[first][:, : alone.shape[1]], alone)


def test_a_task_without_a_label_set_is_refused():
    method = build_method("epi", {}, PET)
    with pytest.raises(SaptError, match="task\\(s\\) task1290_xsum_summarization have no label set") as caught:
        method.set_tasks([TaskInfo("sst2", "classification", ("Good", "Bad")),
                          TaskInfo("task1290_xsum_summarization", "generation", None)])
    assert caught.value.field == "order"
