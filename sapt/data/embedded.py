"""A small instruction benchmark the project generates itself, so a CL run needs no downloads.

Every task reads the same kind of input (five distinct words from ``VOCABULARY``) and answers with one
of those words; only the instruction says which word. A model trained on task B therefore answers
task A's inputs with B's rule (forgetting is visible) and a router can only tell tasks apart by
their instruction. Prompts use the Long Sequence template (sapt-method.md 4.5).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sapt.data.templates import long_sequence_prompt
from sapt.data.types import Example, TaskData
from sapt.errors import SaptError

# Common nouns, each a single token of the embedded backbones' WordPiece tokenizer, none of them a
# word of any instruction below (the answer must come from the input, never from the instruction).
VOCABULARY: tuple[str, ...] = (
    "apple", "river", "horse", "chair", "cloud", "garden", "window", "bread",
    "stone", "forest", "candle", "ocean", "tiger", "violin", "rabbit", "mountain",
    "pencil", "bottle", "castle", "doctor", "engine", "flower", "guitar", "island",
)
WORDS_PER_INPUT = 5


@dataclass(frozen=True)
class _Rule:
    instruction: str
    pick: Callable[[Sequence[str]], str]


# Worded differently on purpose, not one template with a swapped ordinal, so that the instruction
# carries a clear task signal for routing.
_RULES: dict[str, _Rule] = {
    "first-word": _Rule("Which word comes first in this list?", lambda words: words[0]),
    "last-word": _Rule("Name the final item of the sequence below.", lambda words: words[-1]),
    "second-word": _Rule("Tell me the second entry.", lambda words: words[1]),
    "word-before-last": _Rule("Give the term right before the end.", lambda words: words[-2]),
}

TASK_NAMES: list[str] = list(_RULES)


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
        A ``TaskData`` of kind ``"classification"`` with one reference per example.

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
    inputs = _distinct_inputs(rng, num_train + num_val + num_test)

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
    )


def _rule(name: str) -> _Rule:
    try:
        return _RULES[name]
    except KeyError:
        raise SaptError(
            f"unknown embedded task {name!r}; known tasks: {', '.join(TASK_NAMES)}", source="order"
        ) from None


def _distinct_inputs(rng: random.Random, count: int) -> list[tuple[str, ...]]:
    # 24 words choose 5 in order gives 5.1 million inputs, so rejection of repeats stays cheap.
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[str, ...]] = []
    while len(out) < count:
        words = tuple(rng.sample(VOCABULARY, WORDS_PER_INPUT))
        if words not in seen:
            seen.add(words)
            out.append(words)
    return out
