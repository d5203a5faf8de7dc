"""The embedded benchmark: deterministic, disjoint splits, shared inputs and answers, distinct rules."""

from collections import Counter

import pytest

from sapt.data.embedded import TASK_NAMES, VOCABULARY, WORDS_PER_INPUT, answer, build_task, instruction
from sapt.errors import SaptError

SIZES = {"num_train": 200, "num_val": 50, "num_test": 100}


def words_of(source: str) -> list[str]:
    # Long Sequence template: instruction + "\n" + input + "\nOutput: ".
    return source.split("\n")[1].split()


def test_at_least_four_tasks_with_distinct_instructions():
    assert len(TASK_NAMES) >= 4
    instructions = [instruction(name) for name in TASK_NAMES]
    assert len(set(instructions)) == len(instructions)
    # No instruction may contain a possible answer, or the answer could be read off the instruction.
    for text in instructions:
        assert not set(text.lower().replace("?", " ").replace(".", " ").split()) & set(VOCABULARY)


def test_rules_on_a_hand_written_input():
    words = ["apple", "river", "horse", "chair", "cloud"]
    assert answer("first-word", words) == "apple"
    assert answer("last-word", words) == "cloud"
    assert answer("second-word", words) == "river"
    assert answer("word-before-last", words) == "chair"


def test_examples_follow_the_long_sequence_template():
    task = build_task("last-word", **SIZES, seed=0)
    assert task.kind == "classification"
    assert task.instruction == instruction("last-word")
    for ex in task.train[:20] + task.test[:20]:
        assert ex.source == task.instruction + "\n" + " ".join(words_of(ex.source)) + "\nOutput: "
        words = words_of(ex.source)
        assert len(words) == WORDS_PER_INPUT == len(set(words))
        assert ex.target == words[-1]
        assert ex.references == (ex.target,)


def test_same_seed_same_data_other_seed_other_data():
    first = build_task("first-word", **SIZES, seed=3)
    again = build_task("first-word", **SIZES, seed=3)
    other = build_task("first-word", **SIZES, seed=4)
    assert (first.train, first.val, first.test) == (again.train, again.val, again.test)
    assert [ex.source for ex in first.train] != [ex.source for ex in other.train]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_split_sizes_and_disjoint_splits(name):
    task = build_task(name, **SIZES, seed=0)
    assert (len(task.train), len(task.val), len(task.test)) == (200, 50, 100)
    train, val, test = ({ex.source for ex in split} for split in (task.train, task.val, task.test))
    assert len(train) + len(val) + len(test) == 350  # distinct within splits too
    assert not (train & val or train & test or val & test)


def test_every_task_answers_from_the_same_vocabulary():
    for name in TASK_NAMES:
        task = build_task(name, **SIZES, seed=0)
        targets = {ex.target for ex in task.train}
        assert targets <= set(VOCABULARY)
        assert len(targets) >= len(VOCABULARY) - 2  # 200 draws over 24 words cover nearly all
        # Inputs come from the same vocabulary for every task.
        assert {w for ex in task.train for w in words_of(ex.source)} <= set(VOCABULARY)


def test_chance_level_is_low():
    for name in TASK_NAMES:
        task = build_task(name, **SIZES, seed=0)
        most_common = Counter(ex.target for ex in task.test).most_common(1)[0][1]
        assert most_common / len(task.test) < 0.15  # always answering one word scores under 15%


def test_tasks_disagree_on_the_same_inputs():
    # A model that applies task B's rule to task A's inputs must score (near) zero on task A.
    inputs = [words_of(ex.source) for ex in build_task("first-word", **SIZES, seed=0).test]
    for a in TASK_NAMES:
        for b in TASK_NAMES:
            if a != b:
                agree = sum(answer(a, w) == answer(b, w) for w in inputs) / len(inputs)
                assert agree < 0.1, (a, b, agree)


def test_unknown_task_is_a_user_error():
    with pytest.raises(SaptError) as info:
        build_task("third-word", **SIZES, seed=0)
    assert info.value.source == "order"
    assert "first-word" in str(info.value)


def test_negative_size_is_a_user_error():
    with pytest.raises(SaptError) as info:
        build_task("first-word", num_train=-1, num_val=0, num_test=0, seed=0)
    assert info.value.field == "num_train"
