"""Per-task scores and continual-learning metrics, against hand-computed values."""

from __future__ import annotations

import json
import sys

import pytest

from sapt.errors import SaptError
from sapt.evaluation.metrics import (
    cl_metrics,
    exact_match,
    load_matrix_file,
    normalize_answer,
    rouge_l,
    score_task,
)


def test_module_imports_no_torch():
    # The metrics CLI must stay light; run in a fresh interpreter to see what importing pulls in.
    import subprocess

    code = "import sys, sapt.evaluation.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_normalize_answer():
    assert normalize_answer("  The  Answer,\tis: 'Yes'! ") == "the answer is yes"
    # Articles stay (no SQuAD article removal); punctuation inside words is deleted, not spaced.
    assert normalize_answer("A well-known fact.") == "a wellknown fact"


def test_exact_match():
    assert exact_match("Science or Technology.", ["science or technology"]) == 100.0
    assert exact_match("Good", "good") == 100.0
    assert exact_match("the Good", ["Good"]) == 0.0  # "the" is not removed
    assert exact_match("B", ["A", "b"]) == 100.0  # max over references
    assert exact_match("C", ["A", "B"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_rouge_l_stemming_and_lcs():
    # Porter stemming: running -> run, dogs -> dog; every token matches.
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 3/3, R = 3/6,
    # F = 2 * 1 * 0.5 / (1 + 0.5) = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    # Max over references: the second reference matches exactly.
    assert rouge_l("the cat sat", ["a dog ran", "The cat sat."]) == pytest.approx(100.0)
    assert rouge_l("", ["anything"]) == 0.0


def test_score_task():
    # Exact match: 2 of 3 right -> 66.67.
    got = score_task("classification", ["Good", "bad.", "Good"], [["Good"], ["Bad"], ["Bad"]])
    assert got == pytest.approx(200 / 3)
    # Rouge-L: 100 and 200/3 -> mean 250/3.
    got = score_task("generation", ["run dog", "the cat sat"], [["running dogs"], ["the cat sat on the mat"]])
    assert got == pytest.approx(250 / 3)
    with pytest.raises(ValueError):
        score_task("regression", ["a"], [["a"]])
    with pytest.raises(ValueError):
        score_task("generation", ["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        score_task("generation", [], [])


# Row j = after training task j; column i = task i (0-based in code, 1-based in the comments).
MATRIX = [
    [50.0, None, None],
    [40.0, 60.0, None],
    [30.0, 55.0, 70.0],
]
SINGLE = [45.0, 65.0, 60.0]


def test_cl_metrics_hand_computed():
    got = cl_metrics(MATRIX, SINGLE)
    # AP   = (30 + 55 + 70) / 3 = 155 / 3
    # F.Ra = mean(max(50, 40) - 30, max(60) - 55) = mean(20, 5) = 12.5
    # FWT  = mean(50 - 45, 60 - 65, 70 - 60) = (5 - 5 + 10) / 3 = 10 / 3
    # BWT  = mean(30 - 50, 55 - 60) = (-20 - 5) / 2 = -12.5   (divided by T - 1 = 2, not T)
    assert got == {
        "AP": pytest.approx(155 / 3),
        "F.Ra": pytest.approx(12.5),
        "FWT": pytest.approx(10 / 3),
        "BWT": pytest.approx(-12.5),
    }
    assert set(got) == {"AP", "F.Ra", "FWT", "BWT"}


def test_f_ra_takes_the_max_over_earlier_rows_only():
    # Task 1 peaks after task 2 (80), not right after its own training (50).
    m = [[50, None, None], [80, 60, None], [70, 60, 90]]
    got = cl_metrics(m)
    # F.Ra = mean(max(50, 80) - 70, max(60) - 60) = mean(10, 0) = 5
    # BWT  = mean(70 - 50, 60 - 60) = 10
    assert got["F.Ra"] == pytest.approx(5.0)
    assert got["BWT"] == pytest.approx(10.0)
    assert got["FWT"] is None  # no single-task scores
    # Upper-triangle entries are never read, whatever they hold (score.py pads them with 0).
    m0 = [[50, 0, 0], [80, 60, 0], [70, 60, 90]]
    assert cl_metrics(m0) == got


def test_t_equals_one():
    got = cl_metrics([[80.0]], [75.0])
    assert got == {"AP": 80.0, "F.Ra": None, "FWT": 5.0, "BWT": None}


def test_multi_task_run_only_last_row():
    # A multi-task baseline is evaluated once, after training on everything.
    got = cl_metrics([None, [None, None, None], [30, 60, 90]], [1, 2, 3])
    assert got["AP"] == pytest.approx(60.0)  # (30 + 60 + 90) / 3
    assert got["F.Ra"] is None and got["BWT"] is None and got["FWT"] is None


def test_none_entries_null_only_the_metrics_that_read_them():
    m = [[50, None, None], [None, 60, None], [30, 55, 70]]
    got = cl_metrics(m, [45, None, 60])
    assert got["AP"] == pytest.approx(155 / 3)
    # F.Ra needs a[1][0] (None) for task 1 -> None. BWT reads only the diagonal and last row:
    # mean(30 - 50, 55 - 60) = -12.5. FWT needs single[1] (None) -> None.
    assert got["F.Ra"] is None
    assert got["BWT"] == pytest.approx(-12.5)
    assert got["FWT"] is None
    assert cl_metrics([[50, None], [None, None]])["AP"] is None


def test_integers_are_accepted_and_results_are_not_rounded():
    got = cl_metrics([[1, None, None], [1, 1, None], [0, 1, 1]])
    assert got["AP"] == 2 / 3 and isinstance(got["AP"], float)


@pytest.mark.parametrize(
    ("matrix", "single", "source", "field"),
    [
        ([[1, None], [1]], None, "matrix", "[1]"),
        ([[1, None, None], [1, 1, None]], None, "matrix", "[0]"),
        ([], None, "matrix", None),
        ("abc", None, "matrix", None),
        ([[1, None], [1, "x"]], None, "matrix", "[1][1]"),
        ([[1, None], [1, True]], None, "matrix", "[1][1]"),
        ([[1, None], [1, float("nan")]], None, "matrix", "[1][1]"),
        ([[1, None], [1, 2]], [1], "single", None),
        ([[1, None], [1, 2]], [1, "a"], "single", "[1]"),
    ],
)
def test_shape_and_value_errors(matrix, single, source, field):
    with pytest.raises(SaptError) as info:
        cl_metrics(matrix, single)
    assert info.value.source == source and info.value.field == field


def test_load_matrix_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"matrix": MATRIX, "single": SINGLE, "tasks": ["a", "b", "c"]}))
    doc = load_matrix_file(path)
    assert doc == {"matrix": MATRIX, "single": SINGLE}
    assert cl_metrics(doc["matrix"], doc["single"])["FWT"] == pytest.approx(10 / 3)
    path.write_text(json.dumps({"matrix": MATRIX}))
    assert load_matrix_file(str(path)) == {"matrix": MATRIX, "single": None}


@pytest.mark.parametrize(
    ("content", "field", "words"),
    [
        (None, None, "not found"),
        ('{"matrix": [[1]],\n "single": [1,]}', None, "line 2 column"),
        ('{"single": [1]}', "matrix", "missing"),
        ("[[1]]", None, "JSON object"),
        ('{"matrix": [[1, null], [1]]}', "matrix[1]", "2 entries"),
        ('{"matrix": [[1]], "single": [1, 2]}', "single", "1 entries"),
    ],
)
def test_load_matrix_file_errors(tmp_path, content, field, words):
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SaptError) as info:
        load_matrix_file(path)
    assert info.value.source == str(path)
    assert info.value.field == field
    assert words in str(info.value)
