"""A short sequence through the real stack: local Ray, 2 Train workers, DeepSpeed on CPU, MLflow sqlite."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seq_lora_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("e2e")
    args = [
        "order=[first-word,last-word]", "num_workers=2", "train.zero_stage=2",
        f"output_dir={out_dir}", "max_eval_per_task=60",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "sapt.cli", "run", "demo", *[x for a in args for x in ("--set", a)]],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc, out_dir


def test_results_file_is_the_last_stdout_line(seq_lora_run):
    proc, out_dir = seq_lora_run
    last = proc.stdout.strip().splitlines()[-1]
    assert last == str(out_dir / "results.json")
    results = json.loads((out_dir / "results.json").read_text())
    assert results["order"] == ["first-word", "last-word"]
    assert results["method"] == "seq-lora"
    assert results["matrix"][0][1] is None
    assert set(results["metrics"]) == {"AP", "F.Ra", "FWT", "BWT"}


def test_seq_lora_learns_each_task_then_forgets_the_first(seq_lora_run):
    _, out_dir = seq_lora_run
    a = json.loads((out_dir / "results.json").read_text())["matrix"]
    # An untrained LoRA scores about 0 and any fixed word under 15; a learned task scores far above.
    assert a[0][0] >= 60, a
    assert a[1][1] >= 40, a  # the continuing LoRA learns its second task more slowly (measured 68-70)
    assert a[1][0] < a[0][0] - 20, a  # sequential LoRA overwrote task 1
    metrics = json.loads((out_dir / "results.json").read_text())["metrics"]
    assert metrics["F.Ra"] == pytest.approx(a[0][0] - a[1][0])


def test_mlflow_holds_a_parent_and_one_nested_run_per_task(seq_lora_run):
    _, out_dir = seq_lora_run
    results = json.loads((out_dir / "results.json").read_text())
    client = MlflowClient(results["mlflow"]["tracking_uri"])
    parent = client.get_run(results["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["a_2_1"] == pytest.approx(results["matrix"][1][0])
    assert parent.data.params["method"] == "seq-lora"
    children = client.search_runs(
        [results["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_matrix.json", "accuracy_matrix.png", "results.json"} <= artifacts
    losses = client.get_metric_history(children[0].info.run_id, "train_loss")
    assert len(losses) > 5
