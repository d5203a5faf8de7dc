"""Scores for one task (exact match, Rouge-L) and continual-learning metrics over an accuracy matrix.

No torch here: this module backs ``sapt metrics FILE`` and must import fast. Definitions follow
sapt-method.md section 5, with the departures noted where they occur.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sapt.errors import SaptError
from sapt.jsonfile import read_json_object

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_scorer: Any = None  # rouge_score.RougeScorer, built on first use (importing nltk takes a second)


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation without article removal (sapt-method.md 5.4).

    Lowercase, delete every ``string.punctuation`` character, collapse whitespace.
    """
    return " ".join(_PUNCT.sub("", s.lower()).split())


def _as_references(references: str | Sequence[str]) -> Sequence[str]:
    refs = [references] if isinstance(references, str) else references
    if not refs:
        raise ValueError("no reference to score against")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """100.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(r) for r in _as_references(references)) else 0.0


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence-level Rouge-L F-measure x 100, best over references.

    Uses google-research ``rouge_score`` with the Porter stemmer, as the authors' vendored copy did
    (sapt-method.md 5.3). Departure: the authors score against one randomly chosen reference; we
    take the max over all references (sapt-method.md 6.13).
    """
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(_scorer.score(r, prediction)["rougeL"].fmeasure for r in _as_references(references))


def score_task(kind: str, predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Mean score (0-100) of one task's predictions.

    Args:
        kind: "classification" (exact match) or "generation" (Rouge-L).
        predictions: one decoded prediction per instance.
        references_list: the acceptable answers of each instance, aligned with ``predictions``.

    Returns:
        The mean over instances.

    Raises:
        ValueError: unknown kind, no predictions, or misaligned lengths.
    """
    metrics = {"classification": exact_match, "generation": rouge_l}
    if kind not in metrics:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(metrics)}")
    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions for {len(references_list)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    metric = metrics[kind]
    return sum(metric(p, r) for p, r in zip(predictions, references_list)) / len(predictions)


Matrix = Sequence[Sequence[float | None] | None]


def cl_metrics(matrix: Matrix, single: Sequence[float | None] | None = None) -> dict[str, float | None]:
    """AP, F.Ra, FWT and BWT of a continual-learning run (sapt-method.md 5.2).

    ``matrix[j][i]`` is the score on task i after training task j (0-based here); entries with
    i > j are never read and may be None, and a whole row may be None (a multi-task run only
    fills the last row). With L = T - 1 the last row:

    * AP   = mean_i a[L][i]
    * F.Ra = mean_{i<L} (max_{i<=k<L} a[k][i] - a[L][i])
    * FWT  = mean_i (a[i][i] - single[i]); needs ``single``. The released code subtracts a
      hard-coded 50.94 instead.
    * BWT  = mean_{i<L} (a[L][i] - a[i][i]). Departure: the released code divides this sum by T
      (its i = L term is 0), so its published BWT equals ours times (T - 1) / T.

    A metric is None when an entry it reads is None, or when it has no terms (T = 1 gives None
    for F.Ra and BWT). Nothing is rounded.

    Args:
        matrix: T rows of T numbers or None.
        single: optional T single-task scores, the FWT baseline.

    Returns:
        ``{"AP": ..., "F.Ra": ..., "FWT": ..., "BWT": ...}``.

    Raises:
        SaptError: (source ``matrix`` or ``single``) a shape or value problem.
    """
    a, base = _validate(matrix, single, file=None)
    size = len(a)
    last = size - 1

    def mean(terms: list[float | None]) -> float | None:
        if not terms or any(t is None for t in terms):
            return None
        return sum(terms) / len(terms)  # type: ignore[arg-type]

    def diff(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x - y

    def best_before_last(i: int) -> float | None:
        column = [a[k][i] for k in range(i, last)]
        return None if any(v is None for v in column) else max(column)  # type: ignore[type-var]

    return {
        "AP": mean([a[last][i] for i in range(size)]),
        "F.Ra": mean([diff(best_before_last(i), a[last][i]) for i in range(last)]),
        "FWT": None if base is None else mean([diff(a[i][i], base[i]) for i in range(size)]),
        "BWT": mean([diff(a[last][i], a[i][i]) for i in range(last)]),
    }


def load_matrix_file(path: str | Path) -> dict[str, Any]:
    """Read ``{"matrix": [[...]], "single": [...]}`` (``single`` optional) for ``sapt metrics FILE``.

    Args:
        path: a JSON file; other top-level keys are ignored.

    Returns:
        ``{"matrix": rows, "single": list or None}``, shape-checked so ``cl_metrics`` accepts it.

    Raises:
        SaptError: the file is missing, is not valid JSON, or lacks a well-formed "matrix".
    """
    file = Path(path)
    doc = read_json_object(file)
    if "matrix" not in doc:
        raise SaptError("missing key", source=str(file), field="matrix")
    single = doc.get("single")
    _validate(doc["matrix"], single, file=str(file))
    return {"matrix": doc["matrix"], "single": single}


def _validate(
    matrix: Any, single: Any, *, file: str | None
) -> tuple[list[list[float | None]], list[float | None] | None]:
    """Check shapes and values; return the matrix with None rows expanded and numbers as float.

    Errors name ``file`` with fields ``matrix[j][i]`` / ``single[i]`` when reading a file, else
    the sources ``matrix`` / ``single`` with fields ``[j][i]`` / ``[i]``.
    """

    def err(key: str, suffix: str, message: str) -> SaptError:
        if file is None:
            return SaptError(message, source=key, field=suffix or None)
        return SaptError(message, source=file, field=key + suffix)

    if not isinstance(matrix, (list, tuple)) or not matrix:
        raise err("matrix", "", "must be a non-empty list of rows")
    size = len(matrix)
    rows: list[list[float | None]] = []
    for j, row in enumerate(matrix):
        if row is None:
            rows.append([None] * size)
            continue
        if not isinstance(row, (list, tuple)) or len(row) != size:
            got = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise err("matrix", f"[{j}]", f"row must have {size} entries (one per task), got {got}")
        values = []
        for i, v in enumerate(row):
            if not _is_number(v):
                raise err("matrix", f"[{j}][{i}]", f"must be a finite number or null, got {v!r}")
            values.append(None if v is None else float(v))
        rows.append(values)

    if single is None:
        return rows, None
    if not isinstance(single, (list, tuple)) or len(single) != size:
        got = len(single) if isinstance(single, (list, tuple)) else type(single).__name__
        raise err("single", "", f"must have {size} entries (one per task), got {got}")
    for i, v in enumerate(single):
        if not _is_number(v):
            raise err("single", f"[{i}]", f"must be a finite number or null, got {v!r}")
    return rows, [None if v is None else float(v) for v in single]


def _is_number(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
