"""The embedded benchmark: deterministic, disjoint splits, one input domain per task, distinct rules."""

from collections import Counter

import pytest

from sapt.data.embedded import (
    TASK_NAMES, VOCABULARY, WORDS_PER_INPUT, answer, build_task, instruction, task_words, vocabulary_digest,
)
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


def test_every_task_reads_and_answers_from_its_own_domain():
    domains = {name: set(task_words(name)) for name in TASK_NAMES}
    for name in TASK_NAMES:
        task = build_task(name, **SIZES, seed=0)
        targets = {ex.target for ex in task.train}
        assert targets == domains[name]  # 200 draws over 12 words cover them all
        assert {w for ex in task.train for w in words_of(ex.source)} == domains[name]
        # Disjoint domains: an input's words tell its task (what a query router can see).
        assert all(not domains[name] & domains[other] for other in TASK_NAMES if other != name)
    assert set(VOCABULARY) == set().union(*domains.values())


def test_vocabulary_digest_follows_the_words(monkeypatch):
    # The warm-ups exclude these words; a changed list must give new cache keys, not stale weights.
    from sapt.data import embedded

    before = vocabulary_digest()
    monkeypatch.setattr(embedded, "VOCABULARY", VOCABULARY[:-1] + ("kettle",))
    assert vocabulary_digest() != before


def test_chance_level_is_low():
    for name in TASK_NAMES:
        task = build_task(name, **SIZES, seed=0)
        most_common = Counter(ex.target for ex in task.test).most_common(1)[0][1]
        # 12 words per task, 1/12 each; the most frequent of 100 draws stays under 20%.
        assert most_common / len(task.test) < 0.2


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
