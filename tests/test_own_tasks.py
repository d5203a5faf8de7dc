"""A user's own tasks beside the CL_Benchmark folders: JSON Lines, Parquet and save_to_disk folders, read
with ``datasets`` into the same tasks as the benchmark's, and the clear errors their bad files get."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from cli_in_process import run_cli

from sapt.data.loading import load_tasks
from sapt.data.templates import long_sequence_prompt
from sapt.errors import SaptError

DEFINITION = "Is the review positive or negative?"
CAPS = {"max_train_per_task": None, "max_eval_per_task": None, "val_size": 2, "seed": 3}


def _rows(n: int, prefix: str) -> list[dict]:
    return [{"input": f"{prefix} review {k}", "output": "positive" if k % 2 else "negative"} for k in range(n)]


def _write(folder: Path, fmt: str, train: list[dict], test: list[dict], meta: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    splits = {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    if fmt == "disk":
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    for split, table in splits.items():
        if fmt == "jsonl":
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_list()))
        elif fmt == "parquet":
            table.to_parquet(str(folder / f"{split}.parquet"))
    if meta is not None:
        (folder / "task.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A benchmark task (Long Sequence layout) and the same reviews as three tasks of one's own."""
    root = tmp_path / "data"
    bench = root / "Long_Sequence" / "toysst"
    bench.mkdir(parents=True)
    for split, rows in (("train", _rows(12, "bench")), ("test", _rows(4, "bench"))):
        doc = {"Definition": [DEFINITION], "Instances": [{"id": str(k), **r} for k, r in enumerate(rows)]}
        (bench / f"{split}.json").write_text(json.dumps(doc))
    meta = {"definition": DEFINITION, "labels": ["negative", "positive"]}
    for fmt in ("jsonl", "parquet", "disk"):
        _write(root / f"mine-{fmt}", fmt, _rows(12, "bench"), _rows(4, "bench"), meta)
    return root


def test_own_tasks_in_every_format_load_as_the_benchmark_task_with_the_same_rows(data_dir):
    order = ["toysst", "mine-jsonl", "mine-parquet", "mine-disk"]
    bench, *own = load_tasks(str(data_dir), order, **CAPS)
    assert [t.name for t in own] == order[1:]
    def rows(examples):
        return sorted((e.source, e.target, e.references) for e in examples)

    for task in own:  # the same rows and prompts; the split and the caps are drawn per task name
        assert (task.kind, task.labels, task.instruction) == ("classification", ("negative", "positive"), DEFINITION)
        assert rows(task.train + task.val) == rows(bench.train + bench.val) and rows(task.test) == rows(bench.test)
        assert (len(task.train), len(task.val)) == (10, 2)
    assert rows(own[0].test)[0][0] == long_sequence_prompt(DEFINITION, "bench review 0")


def test_an_own_task_without_task_json_is_a_generation_task_with_every_reference(tmp_path):
    rows = [{"input": f"say {k}", "output": [f"a{k}", f"b{k}"]} for k in range(6)]
    _write(tmp_path / "free", "jsonl", rows, rows[:2])
    (task,) = load_tasks(str(tmp_path), ["free"], **CAPS)
    assert task.kind == "generation" and task.labels is None and task.instruction == ""
    assert task.test[0].source == "say 0\nOutput: " and task.test[0].references == ("a0", "b0")
    assert len(task.train) + len(task.val) == 6


@pytest.mark.parametrize(
    "damage, source, expected",
    [
        (lambda f: (f / "train.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": \n'),
         "train.jsonl", "cannot read"),
        (lambda f: (f / "test.jsonl").unlink(), "mine-jsonl", "expected test.jsonl or test.parquet"),
        (lambda f: (f / "train.jsonl").write_text('{"input": "a", "answer": "b"}\n'), "train.jsonl",
         "output: missing column"),
        (lambda f: (f / "train.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": 7, "output": "b"}\n'),
         "train.jsonl", r"\[row 1\].input: must be a string"),
        (lambda f: (f / "task.json").write_text('{"labels": ["a", "a"]}'), "task.json",
         "labels: must be a non-empty list of distinct strings"),
        (lambda f: (f / "task.json").write_text('{"defintion": "x"}'), "task.json", "defintion: unknown key"),
    ],
    ids=["malformed-line", "no-test-split", "no-output-column", "mistyped-input", "repeated-label", "unknown-key"],
)
def test_a_bad_own_task_names_its_file_and_field(data_dir, damage, source, expected):
    damage(data_dir / "mine-jsonl")
    with pytest.raises(SaptError) as err:
        load_tasks(str(data_dir), ["toysst", "mine-jsonl"], **CAPS)
    assert source in str(err.value) and err.match(expected)


def test_a_name_that_is_neither_says_where_it_looked(data_dir):
    with pytest.raises(SaptError, match=r"'mine-csv' not found under .*nor as a task folder of your own") as err:
        load_tasks(str(data_dir), ["toysst", "mine-csv"], **CAPS)
    assert err.value.field == "[1]"


def test_sapt_run_exits_2_on_a_bad_own_task_before_anything_starts(data_dir, tmp_path):
    (data_dir / "mine-parquet" / "test.parquet").write_bytes(b"PAR1 not really")
    out_dir = tmp_path / "out"
    out = run_cli("run", "demo", "--set", f"data_dir={data_dir}", "--set", "order=[toysst,mine-parquet]",
                  "--set", "val_size=2", "--set", f"output_dir={out_dir}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mine-parquet/test.parquet" in lines[0] and "cannot read" in lines[0], out.stderr
