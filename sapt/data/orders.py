"""Named task orders of the SAPT paper, and turning an ``order`` config value into task names.

Orders come from the authors' gen scripts (sapt-method.md 4.6).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sapt.data.cl_benchmark import list_tasks
from sapt.errors import SaptError

logger = logging.getLogger(__name__)

NAMED_ORDERS: dict[str, list[str]] = {
    "superni-1": [
        "task1572_samsum_summary",
        "task363_sst2_polarity_classification",
        "task1290_xsum_summarization",
        "task181_outcome_extraction",
        "task002_quoref_answer_generation",
        "task1510_evalution_relation_extraction",
        "task639_multi_woz_user_utterance_generation",
        "task1729_personachat_generate_next",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task748_glucose_reverse_cause_event_detection",
        "task511_reddit_tifu_long_text_summarization",
        "task591_sciq_answer_generation",
        "task1687_sentiment140_classification",
        "task875_emotion_classification",
    ],
    "superni-2": [
        "task748_glucose_reverse_cause_event_detection",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary",
        "task1687_sentiment140_classification",
        "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification",
        "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next",
        "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization",
        "task002_quoref_answer_generation",
        "task1290_xsum_summarization",
        "task875_emotion_classification",
    ],
    # All 15 datasets as published; the ones absent from data_dir are dropped at resolve time.
    "long-3": [
        "mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb",
        "yelp", "amazon", "sst2", "dbpedia", "agnews", "multirc", "yahoo",
    ],
    "long-4": [
        "yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb",
        "sst2", "dbpedia", "agnews", "yahoo", "multirc", "boolq", "wic",
    ],
}

EMBEDDED_ORDER = "embedded"


def resolve_order(order: str | list[str], data_dir: str | None, *, embedded_tasks: list[str]) -> list[str]:
    """Turn an ``order`` config value into the list of task names to train on, in order.

    Args:
        order: an explicit list of task names (used as given), ``"embedded"``, or a key of
            ``NAMED_ORDERS``.
        data_dir: the CL_Benchmark folder; None or "" means the embedded benchmark.
        embedded_tasks: the embedded benchmark's task names.

    Returns:
        Task names. A named order keeps only the tasks present (in ``data_dir``, or among
        ``embedded_tasks`` when there is none), in their published relative order.

    Raises:
        SaptError: (source ``order``) an empty list, a duplicate, an unknown name, or a named
            order none of whose tasks is present; (source ``data_dir``) a missing data folder.
    """
    if isinstance(order, (list, tuple)):
        return _check_explicit(list(order))
    if not isinstance(order, str):
        raise SaptError(
            f"must be an order name or a list of task names, got {type(order).__name__}", source="order"
        )
    if order == EMBEDDED_ORDER:
        return list(embedded_tasks)
    if order not in NAMED_ORDERS:
        known = ", ".join(sorted([EMBEDDED_ORDER, *NAMED_ORDERS]))
        raise SaptError(f"unknown order {order!r}; known orders: {known}", source="order")

    if data_dir:
        if not Path(data_dir).is_dir():
            raise SaptError("data directory not found", source=str(data_dir))
        available = set(list_tasks(data_dir))
        where = str(data_dir)
    else:
        available = set(embedded_tasks)
        where = "the embedded benchmark"
    wanted = NAMED_ORDERS[order]
    kept = [t for t in wanted if t in available]
    missing = [t for t in wanted if t not in available]
    if not kept:
        raise SaptError(f"none of the tasks of order {order!r} is present in {where}", source="order")
    if missing:
        # Expected for long-3/long-4: five Long Sequence datasets are not distributed offline.
        logger.warning(
            "order %r: %d of %d tasks not in %s, dropped: %s",
            order, len(missing), len(wanted), where, ", ".join(missing),
        )
    return kept


def _check_explicit(tasks: list[str]) -> list[str]:
    if not tasks:
        raise SaptError("task list is empty", source="order")
    seen: set[str] = set()
    for n, task in enumerate(tasks):
        if not isinstance(task, str) or not task:
            raise SaptError(f"must be a non-empty task name, got {task!r}", source="order", field=f"[{n}]")
        if task in seen:
            raise SaptError(f"task {task!r} appears twice", source="order", field=f"[{n}]")
        seen.add(task)
    return tasks
