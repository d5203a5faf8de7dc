"""The prompt templates must reproduce the authors' strings byte for byte (sapt-method.md 4.5)."""

from sapt.data.templates import long_sequence_prompt, superni_prompt


def test_superni_prompt_exact_string():
    got = superni_prompt("  Classify the review.\n", "Great film !")
    assert got == (
        "Definition: Classify the review.\n\n"
        "Now complete the following example -\n"
        "Input: Great film !\n"
        "Output: "
    )


def test_superni_prompt_keeps_input_verbatim():
    # Only the definition is stripped; the input keeps its own whitespace.
    got = superni_prompt("D", "  x \n")
    assert got == "Definition: D\n\nNow complete the following example -\nInput:   x \n\nOutput: "


def test_long_sequence_prompt_exact_string():
    got = long_sequence_prompt("Make a judgement on the sentiment of the given text.\n", "Text: fine . ")
    assert got == "Make a judgement on the sentiment of the given text.\nText: fine . \nOutput: "


def test_long_sequence_prompt_empty_definition_like_copa():
    got = long_sequence_prompt("", "Which sentence is the cause?\nA: a\nB: b")
    assert got == "Which sentence is the cause?\nA: a\nB: b\nOutput: "
    # A whitespace-only definition is empty after stripping, so no blank first line either.
    assert long_sequence_prompt(" \n", "q") == "q\nOutput: "
