"""CL_Benchmark reader on small fixture folders written into tmp_path, plus one smoke test on the real copy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sapt.data.cl_benchmark import find_task_dir, list_tasks, load_task
from sapt.errors import SaptError

REAL_DATA = Path(__file__).parents[2] / "shared/benchmarks/CL_Benchmark"

GEN = "task900_toy_generation"
SENT = "task901_toy_sentiment"
COPA = "toycopa"
LONG = "toysst"


def write_split(folder: Path, split: str, doc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def gen_instances(n: int, prefix: str) -> list[dict]:
    # Three references each, so the seeded choice of training target is visible.
    return [
        {"id": f"{prefix}-{k}", "input": f"{prefix} question {k}", "output": [f"a{k}", f"b{k}", f"c{k}"]}
        for k in range(n)
    ]


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    root = tmp_path / "CL_Benchmark"
    sn = root / "SuperNI"
    train = gen_instances(20, "tr")
    train.insert(7, {"id": "empty", "input": "no answer here", "output": []})
    for split, items in (("train", train), ("test", gen_instances(10, "te"))):
        write_split(sn / GEN, split, {"Definition": ["  Answer the question.\n"], "Instances": items})
    # dev.json equals test.json in the real data and must never be read: make it unreadable JSON.
    write_split(sn / GEN, "dev", "{ not json")

    for split, n in (("train", 12), ("test", 6)):
        items = [{"id": str(k), "input": f"review {k}", "output": "POS" if k % 2 else "NEG"} for k in range(n)]
        write_split(sn / SENT, split, {"Definition": ["Classify."], "Instances": items})

    # Grouped by class, 10 "A" then 10 "B" (the real files are interleaved, but nothing promises it).
    copa_train = [{"input": f"premise {k}", "output": "A" if k < 10 else "B"} for k in range(20)]
    copa_test = [{"input": f"test premise {k}", "output": "A" if k < 4 else "B"} for k in range(8)]
    for split, items in (("train", copa_train), ("test", copa_test)):
        doc = {"Definition": [], "Positive Examples": [], "Instances": items}
        write_split(root / "Long_Sequence" / COPA, split, doc)
    (root / "Long_Sequence" / COPA / "labels.json").write_text('["A", "B"]')

    for split, n in (("train", 10), ("test", 4)):
        items = [{"input": f"Text: s{k}", "output": "Good" if k % 2 else "Bad"} for k in range(n)]
        write_split(root / "Long_Sequence" / LONG, split, {"Definition": ["Judge sentiment.\n"], "Instances": items})
    return root


def load(root: Path, name: str, **kw):
    args = {"max_train": None, "max_eval": None, "val_size": 0, "seed": 0}
    args.update(kw)
    return load_task(root, name, **args)


def sources(examples) -> list[str]:
    return [e.source for e in examples]


def test_find_task_dir_both_benchmarks(bench):
    assert find_task_dir(bench, GEN) == ("SuperNI", bench / "SuperNI" / GEN)
    assert find_task_dir(str(bench), COPA) == ("Long_Sequence", bench / "Long_Sequence" / COPA)
    assert list_tasks(bench) == {GEN: "SuperNI", SENT: "SuperNI", COPA: "Long_Sequence", LONG: "Long_Sequence"}


def test_superni_generation_task(bench):
    task = load(bench, GEN)
    assert task.name == GEN
    assert task.kind == "generation"
    assert task.instruction == "  Answer the question.\n"  # Definition[0] as stored; the template strips
    # 21 train items minus the one with an empty output list; nothing carved with val_size=0.
    assert len(task.train) == 20 and task.val == [] and len(task.test) == 10
    by_source = {e.source: e for e in task.train}
    ex = by_source[
        "Definition: Answer the question.\n\nNow complete the following example -\nInput: tr question 3\nOutput: "
    ]
    assert ex.references == ("a3", "b3", "c3")
    assert ex.target in ex.references
    assert not any("no answer here" in s for s in by_source)
    assert all(e.target in e.references and len(e.references) == 3 for e in task.train + task.test)


def test_reference_choice_is_seeded(bench):
    def targets(seed):
        task = load(bench, GEN, seed=seed)
        return {e.source: e.target for e in task.train}

    assert targets(0) == targets(0)
    # 20 independent choices among 3: two seeds agreeing everywhere would mean the seed is ignored.
    assert targets(0) != targets(1)
    # Every reference position gets used, so it is not always the first one.
    assert {t[0] for t in targets(0).values()} == {"a", "b", "c"}


def test_string_outputs_make_superni_classification(bench):
    task = load(bench, SENT)
    assert task.kind == "classification"
    assert {e.references for e in task.test} == {("POS",), ("NEG",)}
    assert all(e.target == e.references[0] for e in task.train)


def test_long_sequence_empty_definition_like_copa(bench):
    task = load(bench, COPA)
    assert task.kind == "classification"
    assert task.instruction == ""
    assert "premise 0\nOutput: " in sources(task.train)
    long_task = load(bench, LONG)
    assert long_task.kind == "classification"
    assert "Judge sentiment.\nText: s0\nOutput: " in sources(long_task.train)


def test_val_is_carved_from_train_and_disjoint(bench):
    full = load(bench, COPA, val_size=0)
    task = load(bench, COPA, val_size=5)
    assert len(task.val) == 5 and len(task.train) == 15
    assert not set(sources(task.val)) & set(sources(task.train))
    assert set(sources(task.val)) | set(sources(task.train)) == set(sources(full.train))
    # The test split is test.json untouched (dev.json, a broken file here, is never read).
    assert set(sources(task.test)) == {f"test premise {k}\nOutput: " for k in range(8)}
    load(bench, GEN, val_size=3)  # would raise if dev.json were parsed


def test_caps_are_seeded_samples_not_file_heads(bench):
    task = load(bench, COPA, max_train=6, max_eval=4, val_size=2)
    assert (len(task.train), len(task.val), len(task.test)) == (6, 2, 4)
    # The head of the file holds only class A (train) / four A's (test): a sample shows both.
    assert {e.target for e in task.train} == {"A", "B"}
    assert {e.target for e in task.test} == {"A", "B"}
    # A cap never changes the validation split, and a smaller cap keeps a subset.
    uncapped = load(bench, COPA, val_size=2)
    assert task.val == uncapped.val
    assert set(sources(task.train)) < set(sources(uncapped.train))
    assert set(sources(task.test)) < set(sources(uncapped.test))
    # Caps larger than the data keep everything.
    big = load(bench, COPA, max_train=1000, max_eval=1000, val_size=2)
    assert (len(big.train), len(big.test)) == (18, 8)


def test_same_seed_same_data_other_seed_other_split(bench):
    a = load(bench, COPA, max_train=8, max_eval=3, val_size=4, seed=7)
    b = load(bench, COPA, max_train=8, max_eval=3, val_size=4, seed=7)
    c = load(bench, COPA, max_train=8, max_eval=3, val_size=4, seed=8)
    assert a == b
    assert sources(a.val) != sources(c.val)


def test_target_of_an_instance_does_not_depend_on_split_or_caps(bench):
    def targets(**kw):
        task = load(bench, GEN, seed=4, **kw)
        return {e.source: e.target for e in task.train + task.val}

    full = targets()
    for kw in ({"val_size": 5}, {"max_train": 3, "val_size": 2}):
        part = targets(**kw)
        assert part == {s: full[s] for s in part}

def test_large_file_loads_quickly(tmp_path):
    folder = tmp_path / "Long_Sequence" / "big"
    items = [{"input": f"Text: sentence number {k} " * 5, "output": str(k % 4)} for k in range(7600)]
    write_split(folder, "train", {"Definition": ["d"], "Instances": items[:4000]})
    write_split(folder, "test", {"Definition": ["d"], "Instances": items})
    start = time.perf_counter()
    task = load_task(tmp_path, "big", max_train=None, max_eval=None, val_size=100, seed=0)
    elapsed = time.perf_counter() - start
    assert (len(task.train), len(task.val), len(task.test)) == (3900, 100, 7600)
    assert elapsed < 5.0, f"{elapsed:.2f}s to load 11600 instances"  # about 0.05 s on a laptop core


# ---- errors: each names the file (source) and the field -------------------------------------------


def error_of(root, name, **kw) -> SaptError:
    with pytest.raises(SaptError) as info:
        load(root, name, **kw)
    return info.value


def test_missing_data_dir(tmp_path):
    err = error_of(tmp_path / "nope", GEN)
    assert err.source == str(tmp_path / "nope")
    assert "not found" in str(err)


def test_unknown_task_suggests_close_names(bench):
    err = error_of(bench, "toycop")
    assert err.source == str(bench)
    assert "'toycop'" in str(err) and "toycopa" in str(err)
    err = error_of(bench, "task900_toy_generaton")
    assert GEN in str(err)
    err = error_of(bench, "../SuperNI")
    assert "not found" in str(err)


def test_missing_split_file(bench):
    (bench / "Long_Sequence" / LONG / "test.json").unlink()
    err = error_of(bench, LONG)
    assert err.source == str(bench / "Long_Sequence" / LONG / "test.json")
    assert "missing" in str(err)


def test_malformed_json_reports_line_and_column(bench):
    path = write_split(bench / "Long_Sequence" / LONG, "train", '{"Instances": [\n  {"input": "a",}\n]}')
    err = error_of(bench, LONG)
    assert err.source == str(path)
    assert "line 2 column" in str(err)


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"Definition": ["d"]}, "Instances", "missing"),
        ({"Instances": {"input": "a", "output": "b"}}, "Instances", "must be a list"),
        ({"Instances": []}, "Instances", "no instances"),
        ({"Instances": [{"input": "a", "output": []}]}, "Instances", "no instances"),
        ({"Instances": [{"input": "a", "output": "b"}, {"output": "b"}]}, "Instances[1].input", "missing"),
        ({"Instances": [{"input": "a"}]}, "Instances[0].output", "missing"),
        ({"Instances": [{"input": 3, "output": "b"}]}, "Instances[0].input", "must be a string"),
        (
            {"Instances": [{"input": "a", "output": "b"}] * 12 + [{"input": "a", "output": 1}]},
            "Instances[12].output",
            "string",
        ),
        ({"Instances": [{"input": "a", "output": ["x", None]}]}, "Instances[0].output", "list of strings"),
        ({"Instances": ["a"]}, "Instances[0]", "object"),
        ({"Definition": "d", "Instances": [{"input": "a", "output": "b"}]}, "Definition", "list"),
        ({"Definition": [3], "Instances": [{"input": "a", "output": "b"}]}, "Definition[0]", "string"),
    ],
)
def test_malformed_train_fields(bench, doc, field, words):
    path = write_split(bench / "SuperNI" / SENT, "train", doc)
    err = error_of(bench, SENT)
    assert err.source == str(path)
    assert err.field == field
    assert str(path) in str(err) and field in str(err) and words in str(err)


def test_top_level_must_be_an_object(bench):
    path = write_split(bench / "SuperNI" / SENT, "test", "[1, 2]")
    err = error_of(bench, SENT)
    assert err.source == str(path) and "JSON object" in str(err)


def test_val_size_must_leave_training_data(bench):
    err = error_of(bench, LONG, val_size=10)
    assert err.source == str(bench / "Long_Sequence" / LONG / "train.json")
    assert "val_size=10" in str(err)


@pytest.mark.parametrize(("key", "value"), [("max_train", 0), ("max_eval", -1), ("val_size", -1), ("val_size", None)])
def test_bad_caps(bench, key, value):
    err = error_of(bench, LONG, **{key: value})
    assert err.source == key


# ---- smoke test on the real copy ------------------------------------------------------------------


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="CL_Benchmark copy not present")
def test_real_benchmark_smoke():
    sst2 = load_task(REAL_DATA, "sst2", max_train=64, max_eval=32, val_size=16, seed=1)
    assert (sst2.kind, len(sst2.train), len(sst2.val), len(sst2.test)) == ("classification", 64, 16, 32)
    assert {e.target for e in sst2.train} <= {"Good", "Bad"}
    assert sst2.train[0].source.startswith("Make a judgement on the sentiment of the given text.\nText: ")

    t363 = load_task(
        REAL_DATA, "task363_sst2_polarity_classification", max_train=50, max_eval=None, val_size=20, seed=1
    )
    assert (t363.kind, len(t363.train), len(t363.val), len(t363.test)) == ("classification", 50, 20, 100)
    assert {e.target for e in t363.test} == {"POS", "NEG"}
    assert t363.test[0].source.startswith("Definition: In this task, you are given sentences from movie reviews.")

    quoref = load_task(REAL_DATA, "task002_quoref_answer_generation", max_train=10, max_eval=None, val_size=5, seed=1)
    assert quoref.kind == "generation" and len(quoref.test) == 100
    assert any(len(e.references) >= 2 for e in quoref.test)  # 17% of its test items are multi-reference

