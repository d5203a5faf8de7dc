"""SAPT-LoRA through the real stack (ZeRO-3) on two embedded tasks: no forgetting, pseudo prompts, diagnostics."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


EPOCHS, EVAL_ITEMS = 8, 40
SETTINGS = [
    "order=[first-word,last-word]", f"train.epochs={EPOCHS}", f"max_eval_per_task={EVAL_ITEMS}",
    "method_args.generator_steps=100", "train.zero_stage=3",  # the riskiest path: sharded weights
    # The start-of-task pass and micro-batches without router gradients, under ZeRO-3 (docs/sapt.md).
    "method_args.key_init=inputs", "method_args.router_warmup_steps=25", "method_args.query_center=first-tasks",
]


def _sets(settings: list[str]) -> list[str]:
    return [x for s in settings for x in ("--set", s)]


@pytest.fixture(scope="module")
def sapt_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sapt-e2e")
    proc = subprocess.run(
        [sys.executable, "-m", "sapt.cli", "run", "demo-sapt", *_sets([*SETTINGS, f"output_dir={out_dir}"])],
        capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    (out_dir / "run.stdout").write_text(proc.stdout)
    (out_dir / "run.stderr").write_text(proc.stderr)
    return json.loads((out_dir / "results.json").read_text()), out_dir


def test_the_console_shows_our_progress_and_the_log_file_the_rest(sapt_run):
    _, out_dir = sapt_run
    console = (out_dir / "run.stderr").read_text() + (out_dir / "run.stdout").read_text()
    (log_file,) = (out_dir / "logs").glob("run-*.log")
    log = log_file.read_text()
    assert f"log: {log_file}" in console
    for phase in ("stage 1/2 first-word train: ", "stage 1/2 first-word eval: ", "stage 1/2 first-word generator: ",
                  "after first-word: first-word", "stage 2/2 last-word train: ", "after last-word: "):
        assert phase in console, phase
    # Ray's, the workers' and MLflow's own lines are in the log, not on the console.
    for line in ("Started training worker group", "RayTrainWorker", "Created version", "epoch 1 done"):
        assert line in log and line not in console, line
    assert len(console.splitlines()) < 30


def test_the_output_has_no_failed_state_api_asks_and_nothing_was_compiled(sapt_run):
    """Ray Train's placement-group cleaner needs the local Ray's dashboard: without it the output
    got a warning every second of every stage. Worker start-up builds no DeepSpeed op (the
    shared-memory all-reduce op was JIT-compiled on the CPU accelerator, though training never uses
    it), and happens once per run."""
    _, out_dir = sapt_run
    everything = next((out_dir / "logs").glob("run-*.log")).read_text() + (out_dir / "run.stderr").read_text()
    assert "stage 2/2" in everything  # the output was captured
    assert "Failed to query Ray Train Controller actor state" not in everything
    assert "shm_comm_op built" not in everything
    # Warnings our own calls caused: Ray Train's default ingest options, read-only batch arrays.
    assert "exclude_resources" not in everything
    assert "non-writable" not in everything
    # One Ray Train worker group for the whole sequence, not one per task.
    assert everything.count("Started training worker group") == 1


def test_the_results_file_is_the_last_line_and_the_mlflow_run_holds_the_matrix(sapt_run):
    results, out_dir = sapt_run
    assert (out_dir / "run.stdout").read_text().strip().splitlines()[-1] == str(out_dir / "results.json")
    assert results["order"] == ["first-word", "last-word"] and results["method"] == "sapt-lora"
    assert results["matrix"][0][1] is None and set(results["metrics"]) == {"AP", "F.Ra", "FWT", "BWT"}
    assert results["metrics"]["F.Ra"] == pytest.approx(results["matrix"][0][0] - results["matrix"][1][0])
    client = MlflowClient(results["mlflow"]["tracking_uri"])
    parent = client.get_run(results["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["method"] == "sapt-lora"
    assert parent.data.metrics["a_2_1"] == pytest.approx(results["matrix"][1][0])
    assert {"accuracy_matrix.json", "accuracy_matrix.png", "results.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_sapt_learns_the_second_task_without_forgetting_the_first(sapt_run):
    results, _ = sapt_run
    a = results["matrix"]
    assert a[0][0] >= 80, a
    assert a[1][1] >= 80, a
    # A sequential LoRA on the same pair drops task 1 (test_backbones.py); SAPT keeps it.
    assert a[1][0] >= a[0][0] - 10, a


def test_routing_diagnostics_are_in_results(sapt_run):
    results, _ = sapt_run
    attention = results["attention"]  # rows: tasks' test inputs, columns: blocks, after the last task
    assert len(attention) == 2 and all(len(row) == 2 for row in attention)
    assert all(sum(row) == pytest.approx(1.0, abs=1e-4) for row in attention)
    # Task 1's inputs lean on block 1 harder than task 2's do: the router tells the tasks apart.
    assert attention[0][0] > attention[1][0] + 0.05, attention
    assert results["train_attention"][0] == [1.0, None]
    assert 0 <= results["routing_accuracy"] <= 100
    assert len(results["routing_accuracy_per_stage"]) == 2


def test_the_second_key_started_at_the_second_tasks_inputs(sapt_run):
    """key_init: before stage 2 trains, under ZeRO-3, the new key points at the new task's queries."""
    _, out_dir = sapt_run
    log = "".join(f.read_text() for f in (out_dir / "logs").iterdir())
    line = next(line for line in log.splitlines() if "[stage 2/2 last-word] start of task" in line)
    report = json.loads(line.split("start of task: ", 1)[1])
    weights = report["new_block_weight_of_mean_query"]
    assert weights["new task"] > 0.5 and weights["new task"] > weights["remembered"] + 0.2, report
    assert "start of task" not in log.split("[stage 2/2")[0]  # task 1: one key, nothing to aim
    # query_center: task 1's mean pooled embedding after task 1, the midpoint with task 2's at its start,
    # summed over both ranks' shares; it is what the saved router holds from then on.
    first = json.loads(next((out_dir / "ray").glob("*-after-t01/post_task.json")).read_text())
    saved = [load_file(str(next((out_dir / "ray").glob(f"*-after-t0{t}/state/router.safetensors"))))["center"]
             for t in (1, 2)]
    assert first["query_center_norm"] == pytest.approx(float(saved[0].norm()), rel=1e-3) and first["query_center_norm"] > 0
    assert report["query_center_norm"] == pytest.approx(float(saved[1].norm()), rel=1e-3)
    assert not torch.allclose(saved[0], saved[1])


def test_pseudo_prompts_of_the_first_task_were_generated_and_kept(sapt_run):
    _, out_dir = sapt_run
    files = sorted((out_dir / "memory").glob("*.jsonl"))
    assert [f.name for f in files] == ["01-first-word.jsonl"]  # the last task is never replayed
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == 20  # max(1, floor(memory_fraction 5% (the demo-sapt preset) of 400 training items))
    assert all(r["task"] == 0 and r["source"].strip() and r["target"] == "" for r in rows)


def test_the_results_say_where_each_stage_spent_its_time(sapt_run):
    results, _ = sapt_run
    first, second = results["timing"]
    assert [first["tasks"], second["tasks"]] == [["first-word"], ["last-word"]]
    generator = first["generator"]  # the last task trains none: nothing is left to remember it for
    assert "generator" not in second and "memory_seconds" not in second
    assert first["seconds"] >= first["train_seconds"] + generator["seconds"] + first["memory_seconds"] - 1
    assert 0 < generator["steps"] <= generator["max_steps"] == 100
    windows = generator["window_losses"]
    assert len(windows) == generator["steps"] // 25  # the default stop window
    # The default rule: every window but the last fell at least 2% below the best before it (or it
    # would have stopped there), and it stopped early only at a window that did not.
    for k in range(1, len(windows) - 1):
        assert windows[k] <= min(windows[:k]) * 0.98, windows
    assert generator["stopped_early"] == (generator["steps"] < 100)
    if generator["stopped_early"]:
        assert windows[-1] > min(windows[:-1]) * 0.98, windows


def test_the_generation_job_rewrites_the_runs_pseudo_prompts_from_the_logged_generator(sapt_run, local_ray, tmp_path,
                                                                                       capsys):
    from jobs.generate_pseudo import main

    results, out_dir = sapt_run
    generator = f"runs:/{results['mlflow']['run_id']}/generators/01-first-word"
    output = tmp_path / "first-word.jsonl"
    code = main(["demo-sapt", *_sets(SETTINGS), "--task", "first-word", "--generator", generator,
                 "--tracking-uri", results["mlflow"]["tracking_uri"], "--output", str(output), "--actors", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert captured.out.strip().splitlines()[-1] == str(output)
    # The run's seed and settings: the same prompts the run kept, whatever the number of actors.
    assert output.read_text() == (out_dir / "memory" / "01-first-word.jsonl").read_text()


def test_mlflow_has_attention_heatmaps_and_the_arm_loss(sapt_run):
    results, _ = sapt_run
    client = MlflowClient(results["mlflow"]["tracking_uri"])
    run_id = results["mlflow"]["run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"attention_test.png", "attention_train.png", "accuracy_matrix.png"} <= artifacts
    children = client.search_runs([results["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{run_id}'",
                                  order_by=["tags.sapt.task_index"])
    assert len(children) == 2  # one nested run per task
    second = [c for c in children if c.data.tags["sapt.task_index"] == "2"][0]
    # router_warmup_steps=25 is the first epoch (400 items / 2 workers / batch 8): no ARM there.
    assert len(client.get_metric_history(second.info.run_id, "train_arm_kl")) == EPOCHS - 1
    own = [m.value for m in client.get_metric_history(second.info.run_id, "train_own_block_weight")]
    assert len(own) == EPOCHS and all(0 < w < 1 for w in own)
    assert len(client.get_metric_history(run_id, "routing_accuracy")) == 2


def test_the_registered_pool_after_each_task_answers_as_the_run_did(sapt_run):
    from sapt.data.loading import load_tasks
    from sapt.registry import pool_store

    results, out_dir = sapt_run
    uri, run_id, pool = results["mlflow"]["tracking_uri"], results["mlflow"]["run_id"], results["pool"]["name"]
    assert results["pool"]["uri"] == f"models:/{pool}@after-t02"
    tasks = load_tasks(None, ["first-word", "last-word"], max_train_per_task=400, max_eval_per_task=EVAL_ITEMS,
                       val_size=40, seed=42)  # the preset's caps, as the run loaded them
    for t in (1, 2):
        stage = out_dir / "ray" / f"{run_id}-after-t{t:02d}"  # the task's kept final checkpoint
        made = json.loads((stage / "predictions.json").read_text())
        model = pool_store.load_pool(uri, pool, f"after-t{t:02d}", model_config={"device": "cpu"})
        for task in tasks[:t]:
            answers = model.predict(pd.DataFrame({"input": [ex.source for ex in task.test]}))["answer"].tolist()
            assert answers == made[task.name], (t, task.name)
    assert pool_store.show(uri, pool, "newest")["tags"]["source_run_id"] == run_id


def test_the_evaluation_job_scores_the_registered_pool_as_the_run_did(sapt_run, local_ray, capsys):
    from jobs.evaluate_pool import main

    results, _ = sapt_run
    uri, pool = results["mlflow"]["tracking_uri"], results["pool"]["name"]
    code = main([f"models:/{pool}@after-t02", "--tracking-uri", uri, "--max-train-per-task", "400",
                 "--max-eval-per-task", str(EVAL_ITEMS), "--val-size", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    scored = json.loads(captured.out.strip().splitlines()[-1])
    assert list(scored["scores"].values()) == results["matrix"][-1]  # no task ids, same answers, same scores
    run = MlflowClient(uri).get_run(scored["run_id"])
    assert run.data.metrics["mean_score"] == pytest.approx(sum(results["matrix"][-1]) / 2)
