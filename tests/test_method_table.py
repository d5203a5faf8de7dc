"""Generic tests every method in METHODS gets by its row (PEFT's TEST_CASES style).

Per method, on the embedded tiny T5 and two embedded tasks, in-process (no Ray, no DeepSpeed):
train each stage a few steps with the method's own loss (replay items and reflect batches as the
workers hand them), run its post-task pass, save; then
- the backbone is bit-identical to a fresh load, and every task block of stage 1 is bit-identical
  after stage 2 (methods whose blocks are frozen once trained);
- ``load_finished`` on a fresh backbone answers exactly as the in-memory model;
- the state registered in a real MLflow store (sqlite) loads through ``mlflow.pyfunc`` and answers
  like the in-memory model, block weights included.
A method added later gets these tests by its row in EXPECTED_STAGES.
"""

import hashlib
import random
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.data.replay_mix import BalancedMix
from sapt.evaluation.generate import generate_answers
from sapt.methods import METHODS, build_method
from sapt.methods.base import MEMORY_KEY, TASK_KEY, task_infos
from sapt.registry import pool_store
from sapt.registry.mlflow_connection import fluent_uris
from sapt.registry.pool_store import Generation

BACKBONE = "embedded:tiny-t5"
PET = PetConfig(lora_r=4, lora_alpha=8)
GEN = Generation(max_source_len=64, max_target_len=16, max_new_tokens=6, batch_size=8)
STEPS = 6  # per stage: enough to move every trainable weight
FAST_ARGS = {"sapt-lora": {"generator_steps": 1}, "sapt-prompt": {"generator_steps": 1},
             "lfpt5": {"prompt_length": 8, "max_new_tokens": 24}}

# method -> stages for 3 tasks as (row, train_tasks, eval_tasks, fresh, reference)
EXPECTED_STAGES = {
    "seq-lora": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "replay": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "o-lora": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "conpet-static": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False),
                      (2, (2,), (0, 1, 2), False, False)],
    "conpet-dynamic": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False),
                       (2, (2,), (0, 1, 2), False, False)],
    "l2p": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "prog-prompt": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False),
                    (2, (2,), (0, 1, 2), False, False)],
    "lfpt5": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "epi": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "single": [(0, (0,), (0,), True, True), (1, (1,), (1,), True, True), (2, (2,), (2,), True, True)],
    "multitask": [(2, (0, 1, 2), (0, 1, 2), True, False)],
    "sapt-lora": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
    "sapt-prompt": [(0, (0,), (0,), False, False), (1, (1,), (0, 1), False, False), (2, (2,), (0, 1, 2), False, False)],
}
FROZEN_BLOCKS = {"o-lora", "conpet-dynamic", "epi", "prog-prompt", "sapt-lora", "sapt-prompt"}  # a finished task's block never changes again


def test_the_table_covers_every_method():
    assert set(EXPECTED_STAGES) == set(METHODS)


@pytest.mark.parametrize("name", sorted(EXPECTED_STAGES))
def test_stages(name):
    stages = build_method(name, {}, PET).stages(3)
    assert [(s.row, s.train_tasks, s.eval_tasks, s.fresh, s.reference) for s in stages] == EXPECTED_STAGES[name]


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(None, "embedded", max_train_per_task=40, max_eval_per_task=6, val_size=8, seed=0)[:2]


def _train_batch(collator, rows):
    batch = collator.train_batch([r["source"] for r in rows], [r["target"] for r in rows])
    batch[TASK_KEY] = torch.tensor([r["task"] for r in rows])
    batch[MEMORY_KEY] = torch.tensor([r["memory"] for r in rows])
    return batch


def _remembered(method, tasks, index):
    """What the runner keeps of a finished task, for real memory (pseudo: its inputs stand in)."""
    spec = method.memory()
    picks = random.Random(index).sample(tasks[index].train, spec.count(len(tasks[index].train)))
    return [{"task": index, "memory": True, "source": ex.source, "target": ex.target if spec.keeps_answers else ""}
            for ex in picks]


def _train_stage(method, model, collator, tasks, stage, memory):
    torch.manual_seed(stage.row)
    rows = [{"task": i, "memory": False, "source": ex.source, "target": ex.target}
            for i in stage.train_tasks for ex in tasks[i].train]
    spec = method.memory()
    balanced = None
    if spec and spec.use == "replay" and memory:
        if spec.mix == "balanced":  # as the workers build them: new items plus task-uniform old ones
            balanced = BalancedMix(memory, batch_size=8, old_share=spec.old_share, rng=random.Random(stage.row))
        else:
            rows += [r for i in sorted(memory) for r in memory[i]]
    random.Random(stage.row).shuffle(rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    model.train()
    for step in range(STEPS):
        if balanced is not None:
            new = rows[step * balanced.new_per_batch : (step + 1) * balanced.new_per_batch]
            batch = _train_batch(collator, new + [item for _, item in balanced.draw_old()])
        else:
            batch = _train_batch(collator, rows[step * 8 : step * 8 + 8] or rows[:8])
        reflect = None
        if spec and spec.use == "reflect" and memory:
            reflect = {i: collator.generation_batch([r["source"] for r in memory[i]]) for i in sorted(memory)}
        loss, _ = method.loss(model, batch, reflect)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    if method.post_task_split is not None:
        newest = tasks[stage.train_tasks[-1]]
        examples = newest.val if method.post_task_split == "val" else newest.train
        batch = collator.generation_batch([ex.source for ex in examples])
        with torch.no_grad():
            sums = method.post_task_sums(model, batch, [ex.target for ex in examples])
        method.finish_task(model, stage.train_tasks[-1], sums, len(examples))


def _answers(method, model, collator, inputs):
    answers = generate_answers(model, collator, inputs, max_new_tokens=GEN.max_new_tokens, device=torch.device("cpu"))
    with torch.no_grad():
        weights = method.attention(model, collator.generation_batch(inputs))
    return answers, weights


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=sorted(EXPECTED_STAGES))
def trained(request, tasks, tmp_path_factory):
    """A method run through two tasks in-process: states after each stage and the final in-memory model."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    method = build_method(name, FAST_ARGS.get(name, {}), PET)
    method.set_tasks(task_infos(tasks))  # as the runner and the workers do
    memory: dict[int, list[dict]] = {}
    states, state, moved = [], None, []
    for stage in method.stages(len(tasks)):
        backbone = load_backbone(BACKBONE)
        collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, GEN.max_source_len, GEN.max_target_len)
        model = method.build(backbone, None if stage.fresh else state, stage)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        _train_stage(method, model, collator, tasks, stage, memory)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        # any, not all: with one block SAPT's router gets no gradient (a softmax over one key)
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, after)))
        state = root / f"stage{stage.row}"
        method.save(model, state)
        states.append((stage, state))
        spec = method.memory()
        if spec is not None and spec.source == "self":  # every finished task, written by the newest model
            model.eval()
            for index in range(stage.train_tasks[-1] + 1):
                written = method.sample_memory(model, collator, index, spec.count(len(tasks[index].train)), seed=index)
                memory[index] = [{"task": index, "memory": True, **item} for item in written]
        elif spec is not None:
            memory[stage.train_tasks[-1]] = _remembered(method, tasks, stage.train_tasks[-1])
    inputs = [ex.source for t in tasks for ex in t.test]
    return {"name": name, "method": method, "model": model, "backbone": backbone, "collator": collator,
            "states": states, "moved": moved, "inputs": inputs, "expected": _answers(method, model, collator, inputs)}


def test_training_moves_only_pet_weights_and_finished_blocks_stay_frozen(trained):
    fresh = dict(load_backbone(BACKBONE).model.named_parameters())
    trained_backbone = dict(trained["backbone"].model.named_parameters())
    untouched = [n for n, p in fresh.items() if n in trained_backbone and torch.equal(p, trained_backbone[n])]
    assert len(untouched) == len([n for n in fresh if n in trained_backbone]) > 0
    method, states = trained["method"], trained["states"]
    if trained["name"] in FROZEN_BLOCKS:
        (first_stage, first), (last_stage, last) = states[0], states[-1]
        block = method.finished_files(first, first_stage.row).blocks[0]
        assert _digest(first / block) == _digest(last / block)
        assert method.finished_files(last, last_stage.row).blocks[0] == block
    assert all(trained["moved"])  # every stage trained something


def test_load_finished_answers_as_the_in_memory_model(trained):
    method = build_method(trained["name"], FAST_ARGS.get(trained["name"], {}), PET)
    stage, state = trained["states"][-1]
    model = method.load_finished(load_backbone(BACKBONE), state)
    assert not any(p.requires_grad for p in model.parameters())
    answers, weights = _answers(method, model, trained["collator"], trained["inputs"])
    expected_answers, expected_weights = trained["expected"]
    assert answers == expected_answers
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, expected_weights)


def test_the_registered_version_loads_through_pyfunc_and_answers_alike(trained, tmp_path):
    method = trained["method"]
    stage, state = trained["states"][-1]
    files = method.finished_files(state, stage.row)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("table", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    backbone = trained["backbone"]
    version = pool_store.register_task(
        uri, pool_name=f"table-{trained['name']}", state_dir=state, blocks=files.blocks, shared=files.shared,
        task_index=stage.row, task_names=["first", "second"], method=trained["name"],
        method_args=method.args.model_dump(mode="json"), pet=PET.model_dump(), backbone_spec=BACKBONE,
        backbone_identity=backbone.identity, benchmark="embedded", metrics={"AP": 1.0}, source_run_id=run_id,
        generation=GEN)
    assert len(version.blocks) == len(files.blocks)
    with fluent_uris(uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.pool}")
    out = loaded.predict(pd.DataFrame({"input": trained["inputs"]}))
    answers, weights = trained["expected"]
    assert out["answer"].tolist() == answers
    if weights is None:
        assert out["block_weights"].tolist() == [[] for _ in answers]
    else:
        torch.testing.assert_close(torch.tensor(out["block_weights"].tolist()), weights)


def test_unknown_method_args_are_rejected_naming_the_key():
    from sapt.errors import SaptError

    with pytest.raises(SaptError, match="method_args.lambda: unknown key for method seq-lora"):
        build_method("seq-lora", {"lambda": 1}, PET)
