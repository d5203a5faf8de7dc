"""A small instruction benchmark the project generates itself, so a CL run needs no downloads.

Every task reads five distinct words and answers with one of them; the instruction says which one.
As in a real task stream (SuperNI, Long Sequence), tasks differ both in their instruction and in
their input domain: each task draws its words from its own theme (food, animals, landscape, things).
The rules apply to any word list, so a model trained on task B answers task A's inputs with B's rule
(forgetting is visible). Prompts use the Long Sequence template (sapt-method.md 4.5).

Until 2026-12 every task drew from one shared word list, so the tasks differed only in 6-8
instruction tokens. A max-pooled embedding query (SAPT's router, sapt-method.md 1.1) could not
separate them on the tiny backbones: block 1 kept 75-93% of the attention of every task, and SAPT's
result hung on rounding (docs/sapt.md, "Routing on the embedded benchmark").
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sapt.data.templates import long_sequence_prompt
from sapt.data.types import Example, TaskData
from sapt.errors import SaptError

WORDS_PER_INPUT = 5


@dataclass(frozen=True)
class _Rule:
    instruction: str
    pick: Callable[[Sequence[str]], str]
    words: tuple[str, ...]  # the task's input domain


# Common nouns, each a single token of the embedded backbones' WordPiece tokenizer, none of them a
# word of any instruction below (the answer must come from the input, never from the instruction).
# Instructions are worded differently on purpose, not one template with a swapped ordinal.
_RULES: dict[str, _Rule] = {
    "first-word": _Rule(
        "Which word comes first in this list?", lambda words: words[0],
        ("apple", "bread", "cheese", "butter", "orange", "lemon",
         "rice", "soup", "cake", "honey", "sugar", "salt"),
    ),
    "last-word": _Rule(
        "Name the final item of the sequence below.", lambda words: words[-1],
        ("horse", "tiger", "rabbit", "wolf", "bear", "eagle",
         "snake", "mouse", "sheep", "lion", "fox", "whale"),
    ),
    "second-word": _Rule(
        "Tell me the second entry.", lambda words: words[1],
        ("river", "cloud", "forest", "ocean", "mountain", "island",
         "stone", "desert", "valley", "lake", "storm", "hill"),
    ),
    "word-before-last": _Rule(
        "Give the term right before the end.", lambda words: words[-2],
        ("chair", "window", "candle", "violin", "pencil", "bottle",
         "guitar", "engine", "table", "mirror", "hammer", "lamp"),
    ),
}

TASK_NAMES: list[str] = list(_RULES)
# Every word any task can show; the backbones' warm-ups never see one of them.
VOCABULARY: tuple[str, ...] = tuple(word for rule in _RULES.values() for word in rule.words)


def vocabulary_digest() -> str:
    """A short hash of ``VOCABULARY``: part of the warm-up cache keys, which exclude these words."""
    return hashlib.sha256(" ".join(VOCABULARY).encode()).hexdigest()[:12]


def task_words(name: str) -> tuple[str, ...]:
    """The words task ``name`` draws its inputs (and so its answers) from.

    Raises:
        SaptError: ``name`` is not in ``TASK_NAMES`` (source ``order``).
    """
    return _rule(name).words


def instruction(name: str) -> str:
    """The instruction (task definition) of an embedded task.

    Raises:
        SaptError: ``name`` is not in ``TASK_NAMES`` (source ``order``).
    """
    return _rule(name).instruction


def answer(name: str, words: Sequence[str]) -> str:
    """The reference answer of task ``name`` for an input word list.

    Args:
        name: one of ``TASK_NAMES``.
        words: the input words, in order.

    Returns:
        The one word the task asks for.

    Raises:
        SaptError: ``name`` is not in ``TASK_NAMES`` (source ``order``).
    """
    return _rule(name).pick(words)


def build_task(name: str, *, num_train: int, num_val: int, num_test: int, seed: int) -> TaskData:
    """Generate one embedded task, deterministically from ``seed`` and ``name``.

    Inputs are distinct within and across the three splits, so no test input is seen in training.

    Args:
        name: one of ``TASK_NAMES``.
        num_train: number of training examples.
        num_val: number of validation examples.
        num_test: number of test examples.
        seed: the benchmark seed; the same seed gives the same data on every machine.

    Returns:
        A ``TaskData`` of kind ``"classification"`` with one reference per example; its label
        set is the task's word list.

    Raises:
        SaptError: ``name`` is unknown (source ``order``), or a split size is negative.
    """
    rule = _rule(name)
    sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    for key, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise SaptError(f"must be a non-negative integer, got {size!r}", source="embedded", field=key)
    # A string seed goes through SHA-512 in random.Random, so it is stable across runs and Pythons.
    rng = random.Random(f"sapt-embedded:{seed}:{name}")
    inputs = _distinct_inputs(rng, rule.words, num_train + num_val + num_test)

    def examples(chunk: list[tuple[str, ...]]) -> list[Example]:
        out = []
        for words in chunk:
            target = rule.pick(words)
            out.append(Example(long_sequence_prompt(rule.instruction, " ".join(words)), target, (target,)))
        return out

    return TaskData(
        name=name,
        kind="classification",
        instruction=rule.instruction,
        train=examples(inputs[:num_train]),
        val=examples(inputs[num_train:num_train + num_val]),
        test=examples(inputs[num_train + num_val:]),
        labels=rule.words,  # every answer is one of the task's words
    )


def _rule(name: str) -> _Rule:
    try:
        return _RULES[name]
    except KeyError:
        raise SaptError(
            f"unknown embedded task {name!r}; known tasks: {', '.join(TASK_NAMES)}", source="order"
        ) from None


def _distinct_inputs(rng: random.Random, words: Sequence[str], count: int) -> list[tuple[str, ...]]:
    # 12 words choose 5 in order gives 95,040 inputs, so rejection of repeats stays cheap.
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[str, ...]] = []
    while len(out) < count:
        drawn = tuple(rng.sample(words, WORDS_PER_INPUT))
        if drawn not in seen:
            seen.add(drawn)
            out.append(drawn)
    return out
