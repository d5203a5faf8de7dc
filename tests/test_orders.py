"""Named paper orders and resolving an ``order`` config value."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sapt.data.orders import NAMED_ORDERS, resolve_order
from sapt.errors import SaptError

REAL_DATA = Path(__file__).parents[2] / "shared/benchmarks/CL_Benchmark"
LONG_15 = {
    "agnews", "amazon", "boolq", "cb", "copa", "dbpedia", "imdb", "mnli",
    "multirc", "qqp", "rte", "sst2", "wic", "yahoo", "yelp",
}


def make_bench(root: Path, superni: list[str], long: list[str]) -> Path:
    for bench, names in (("SuperNI", superni), ("Long_Sequence", long)):
        for name in names:
            (root / bench / name).mkdir(parents=True)
    return root


def test_named_orders_match_the_paper():
    assert NAMED_ORDERS["superni-1"][:3] == [
        "task1572_samsum_summary",
        "task363_sst2_polarity_classification",
        "task1290_xsum_summarization",
    ]
    assert NAMED_ORDERS["superni-2"][0] == "task748_glucose_reverse_cause_event_detection"
    assert NAMED_ORDERS["superni-2"][-1] == "task875_emotion_classification"
    # Both SuperNI orders are permutations of the same 15 tasks.
    assert len(NAMED_ORDERS["superni-1"]) == 15
    assert sorted(NAMED_ORDERS["superni-1"]) == sorted(NAMED_ORDERS["superni-2"])
    assert NAMED_ORDERS["long-3"][:4] == ["mnli", "cb", "wic", "copa"]
    assert NAMED_ORDERS["long-4"][:4] == ["yelp", "amazon", "mnli", "cb"]
    for key in ("long-3", "long-4"):
        assert len(NAMED_ORDERS[key]) == 15 and set(NAMED_ORDERS[key]) == LONG_15


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="CL_Benchmark copy not present")
def test_superni_orders_name_real_folders():
    present = {p.name for p in (REAL_DATA / "SuperNI").iterdir()}
    assert set(NAMED_ORDERS["superni-1"]) == present


def test_named_order_drops_missing_datasets_keeping_order(tmp_path, caplog):
    root = make_bench(tmp_path, [], ["sst2", "mnli", "copa", "wic", "agnews"])
    with caplog.at_level(logging.WARNING, logger="sapt.data.orders"):
        got = resolve_order("long-3", str(root), embedded_tasks=[])
    assert got == ["mnli", "wic", "copa", "sst2", "agnews"]
    assert "dbpedia" in caplog.text and "10 of 15" in caplog.text
    assert resolve_order("long-4", str(root), embedded_tasks=[]) == ["mnli", "copa", "sst2", "agnews", "wic"]


def test_named_order_with_nothing_present(tmp_path):
    root = make_bench(tmp_path, ["task1_other"], [])
    with pytest.raises(SaptError) as info:
        resolve_order("superni-1", str(root), embedded_tasks=[])
    assert info.value.source == "order" and "superni-1" in str(info.value)


def test_named_order_missing_data_dir(tmp_path):
    with pytest.raises(SaptError) as info:
        resolve_order("long-3", str(tmp_path / "absent"), embedded_tasks=[])
    assert info.value.source == str(tmp_path / "absent")


def test_explicit_list_is_used_as_given(tmp_path):
    # No filtering: unknown names surface later, when loading, with the task named.
    assert resolve_order(["b", "a", "zzz"], str(tmp_path), embedded_tasks=[]) == ["b", "a", "zzz"]
    assert resolve_order(("x",), None, embedded_tasks=[]) == ["x"]


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ([], "empty"),
        (["a", "b", "a"], "'a' appears twice"),
        (["a", ""], "non-empty"),
        (["a", 3], "non-empty"),
        (7, "must be"),
    ],
)
def test_bad_explicit_lists(order, words):
    with pytest.raises(SaptError) as info:
        resolve_order(order, None, embedded_tasks=[])
    assert info.value.source == "order" and words in str(info.value)


def test_embedded_order():
    assert resolve_order("embedded", None, embedded_tasks=["t1", "t2"]) == ["t1", "t2"]
    # A paper order without data_dir is checked against the embedded tasks.
    with pytest.raises(SaptError):
        resolve_order("superni-1", None, embedded_tasks=["t1"])


def test_unknown_order_lists_known_names():
    with pytest.raises(SaptError) as info:
        resolve_order("superni-3", None, embedded_tasks=[])
    msg = str(info.value)
    assert info.value.source == "order"
    assert all(k in msg for k in ("embedded", "long-3", "long-4", "superni-1", "superni-2"))
