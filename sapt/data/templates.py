"""Instruction templates that turn (definition, input) into the prompt the model reads.

Both follow the authors' data collator exactly (sapt-method.md 4.5); the paper's [INS]/[IN]/[OUT]
is only notation. No task or dataset name prefix is added.
"""

from __future__ import annotations

ANSWER_CUE = "\nOutput: "  # every prompt ends with it; the model answers right after


def superni_prompt(definition: str, input: str) -> str:  # noqa: A002 (mirrors the data field name)
    """Prompt for a SuperNI task.

    Args:
        definition: the task's ``Definition[0]``; surrounding whitespace is stripped.
        input: the instance's ``input``, used verbatim.

    Returns:
        ``"Definition: <def>\\n\\nNow complete the following example -\\nInput: <input>\\nOutput: "``.
    """
    return (
        "Definition: " + definition.strip() + "\n\nNow complete the following example -\nInput: "
        + input + ANSWER_CUE
    )


def long_sequence_prompt(definition: str, input: str) -> str:  # noqa: A002
    """Prompt for a Long Sequence dataset.

    Args:
        definition: the dataset's ``Definition[0]``, or ``""`` when the list is empty (copa).
        input: the instance's ``input``, used verbatim.

    Returns:
        ``"<def>\\n<input>\\nOutput: "``, or ``"<input>\\nOutput: "`` when the definition is empty.
    """
    definition = definition.strip()
    if not definition:
        # copa has an empty Definition list: the authors' code then drops the instruction line.
        return input + ANSWER_CUE
    return definition + "\n" + input + ANSWER_CUE
