"""load_tasks: an order of CL_Benchmark tasks from a fixture folder, or the embedded benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sapt.data import embedded
from sapt.data.loading import load_tasks
from sapt.errors import SaptError


def write_task(root: Path, bench: str, name: str, n_train: int, n_test: int) -> None:
    folder = root / bench / name
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        output = ["x", "y"] if bench == "SuperNI" else "x"
        items = [{"input": f"{name} {split} {k}", "output": output} for k in range(n)]
        (folder / f"{split}.json").write_text(json.dumps({"Definition": [f"Do {name}."], "Instances": items}))


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    write_task(tmp_path, "Long_Sequence", "mnli", 30, 20)
    write_task(tmp_path, "Long_Sequence", "copa", 30, 20)
    write_task(tmp_path, "Long_Sequence", "sst2", 30, 20)
    write_task(tmp_path, "SuperNI", "task363_sst2_polarity_classification", 30, 20)
    return tmp_path


def load(data_dir, order, **kw):
    args = {"max_train_per_task": None, "max_eval_per_task": None, "val_size": 0, "seed": 0}
    args.update(kw)
    return load_tasks(data_dir, order, **args)


def test_named_order_from_folder(bench):
    tasks = load(str(bench), "long-3", max_train_per_task=10, max_eval_per_task=5, val_size=4)
    # long-3 = mnli, cb, wic, copa, ..., sst2, ...: only the three present remain, in that order.
    assert [t.name for t in tasks] == ["mnli", "copa", "sst2"]
    assert all((len(t.train), len(t.val), len(t.test)) == (10, 4, 5) for t in tasks)
    assert all(t.kind == "classification" for t in tasks)


def test_explicit_order_mixes_benchmarks(bench):
    tasks = load(bench, ["task363_sst2_polarity_classification", "copa"], val_size=5)
    assert [t.name for t in tasks] == ["task363_sst2_polarity_classification", "copa"]
    assert tasks[0].kind == "generation"  # list outputs in this fixture
    assert tasks[0].train[0].source.startswith("Definition: Do task363")
    assert (len(tasks[1].train), len(tasks[1].val), len(tasks[1].test)) == (25, 5, 20)


def test_unknown_task_in_explicit_order(bench):
    with pytest.raises(SaptError) as info:
        load(bench, ["copa", "sst"])
    err = info.value
    assert err.source == "order" and err.field == "[1]"
    assert "'sst'" in str(err) and "sst2" in str(err)  # suggests the close name


def test_missing_data_dir(tmp_path):
    with pytest.raises(SaptError) as info:
        load(tmp_path / "absent", ["copa"])
    assert info.value.source == str(tmp_path / "absent")


def test_embedded_order_needs_empty_data_dir(bench):
    with pytest.raises(SaptError) as info:
        load(bench, "embedded")
    assert info.value.source == "order"


def test_embedded_benchmark_defaults_and_caps():
    tasks = load(None, "embedded", val_size=3)
    assert [t.name for t in tasks] == embedded.TASK_NAMES
    # No caps: 1000 train and 200 test per embedded task.
    assert all((len(t.train), len(t.val), len(t.test)) == (1000, 3, 200) for t in tasks)
    capped = load("", embedded.TASK_NAMES[:2], max_train_per_task=7, max_eval_per_task=4, val_size=2, seed=3)
    assert [(len(t.train), len(t.val), len(t.test)) for t in capped] == [(7, 2, 4)] * 2
    assert capped == load("", embedded.TASK_NAMES[:2], max_train_per_task=7, max_eval_per_task=4, val_size=2, seed=3)


def test_embedded_unknown_task():
    with pytest.raises(SaptError) as info:
        load(None, [embedded.TASK_NAMES[0], "sst2"])
    assert info.value.source == "order" and "sst2" in str(info.value)
