"""Routing diagnostics from per-stage worker summaries: what results.json and MLflow get."""

import pytest

from sapt.evaluation.plots import attention_heatmap
from sapt.evaluation.routing import RoutingRecord

NAMES = ["a", "b"]


def _stage(tasks: dict, remembered):
    return {"tasks": tasks, "remembered": remembered}


def test_accuracy_matrices_and_padding():
    record = RoutingRecord(2)
    record.add(0, _stage({"a": {"sum": [4.0], "count": 4, "own_block": 4}}, [1.0]), NAMES)
    record.add(1, _stage({"a": {"sum": [3.0, 1.0], "count": 4, "own_block": 3},
                          "b": {"sum": [2.4, 3.6], "count": 6, "own_block": 4}}, [0.4, 0.6]), NAMES)
    results = record.results()
    assert results["routing_accuracy"] == pytest.approx(100 * 7 / 10)
    assert results["routing_accuracy_per_stage"] == [100.0, pytest.approx(70.0)]
    assert results["attention"] == [[0.75, 0.25], [pytest.approx(0.4), pytest.approx(0.6)]]
    assert results["train_attention"] == [[1.0, None], [0.4, 0.6]]


def test_methods_without_routing_add_nothing():
    record = RoutingRecord(3)
    record.add(0, None, ["x", "y", "z"])
    assert record.results() == {}


def test_heatmap_draws_partial_rows(tmp_path):
    path = attention_heatmap([[1.0, None], None], NAMES, tmp_path / "a.png", "t")
    assert path.stat().st_size > 1000
