"""`sapt sweep` end to end on the tiniest budget: two Tune trials of SAPT-LoRA over two embedded tasks.

The sweep runs in a subprocess with its own local Ray, then the same command runs again with --resume
and must re-run nothing. The tests check the finished sweep: MLflow runs, sampled values, the best
config. Bad space files are checked without Ray.

An interrupted sweep (SIGKILL of the sweep and its Ray right after Tune recorded the first trial as
finished, then --resume) is checked too when SAPT_TEST_SWEEP_INTERRUPT=1: it costs another ~3-4 min
on 2 cores, over this file's budget.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_processes import kill_tree

from sapt.errors import SaptError
from sapt.tuning.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "tuning" / "sapt-lora.yaml"
NAME = "tiny-sweep"
ORDER = "first-word+last-word"
TINY = ["order=[first-word,last-word]", "train.epochs=1", "max_train_per_task=48", "max_eval_per_task=8",
        "val_size=8", "num_workers=1", "method_args.generator_steps=3", "method_args.generator_max_new_tokens=8"]
# Tune saves its experiment state every second (default: every 10 s or more): the interruption test
# can kill sooner after the first trial is recorded as finished.
ENV = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}


def _command(out_dir: Path, *extra: str) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return [sys.executable, "-m", "sapt.cli", "sweep", "demo-sapt", *sets, "--samples", "2",
            "--output", str(out_dir), "--name", NAME, *extra]


def _tune_statuses(out_dir: Path) -> dict[str, str]:
    """trial id -> status in Tune's newest saved experiment state (what a restore reads)."""
    states = sorted((out_dir / "tune" / ORDER).glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # caught mid-write
        return {}
    trials = [json.loads(item[0]) for item in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def _reports(out_dir: Path) -> dict[str, str]:
    """trial id -> Tune's result.json (one line per report)."""
    return {p.parent.name: p.read_text() for p in (out_dir / "tune" / ORDER).glob("*/result.json")}


def _finished(out_dir: Path, first: subprocess.CompletedProcess, resumed: subprocess.CompletedProcess,
              **extra) -> dict:
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"out_dir": out_dir, "first": first, "resumed": resumed, "summary": summary,
            "trials": summary["orders"][ORDER]["trials"], **extra}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep, then the same command with --resume."""
    out_dir = tmp_path_factory.mktemp("sweep") / NAME
    started = time.perf_counter()
    first = subprocess.run(_command(out_dir), capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert first.returncode == 0, first.stderr[-5000:]
    swept = time.perf_counter() - started
    reports = _reports(out_dir)
    client, experiment_id = _client(json.loads((out_dir / "summary.json").read_text()))
    runs = {r.info.run_id for r in client.search_runs([experiment_id])}
    resumed = subprocess.run(_command(out_dir, "--resume"), capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env=ENV)
    print(f"sweep {swept:.0f} s, resume of the finished sweep {time.perf_counter() - started - swept:.0f} s")
    return _finished(out_dir, first, resumed, reports_before=reports, runs_before=runs)


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """SIGKILL of the sweep and its Ray once Tune recorded a finished trial; then --resume."""
    if os.environ.get("SAPT_TEST_SWEEP_INTERRUPT") != "1":
        pytest.skip("set SAPT_TEST_SWEEP_INTERRUPT=1 to run the interruption test (about 3-4 min on 2 cores)")
    out_dir = tmp_path_factory.mktemp("interrupted") / NAME
    logs = out_dir.parent
    with open(logs / "first.err", "w") as err:
        proc = subprocess.Popen(_command(out_dir), stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=ENV)
        finished: list[str] = []
        try:
            deadline = time.monotonic() + 400
            while not finished and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
                finished = [t for t, s in _tune_statuses(out_dir).items() if s == "TERMINATED"]
        finally:
            kill_tree(proc)
    assert finished, (logs / "first.err").read_text()[-5000:]
    reports = _reports(out_dir)
    resumed = subprocess.run(_command(out_dir, "--resume"), capture_output=True, text=True, timeout=400, cwd=ROOT,
                             env=ENV)
    return _finished(out_dir, None, resumed, kept=finished[0], reports_before=reports)


def _client(summary):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name(NAME)
    assert experiment is not None
    return client, experiment.experiment_id


@pytest.mark.slow
def test_resume_of_a_finished_sweep_reruns_nothing(sweep):
    out_dir = sweep["out_dir"]
    assert "resuming the Tune experiment" in sweep["resumed"].stderr
    assert _reports(out_dir) == sweep["reports_before"]  # no trial reported again
    client, experiment_id = _client(sweep["summary"])
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == sweep["runs_before"]
    last = [line.strip().splitlines()[-1] for line in (sweep["first"].stdout, sweep["resumed"].stdout)]
    assert last[0] == last[1] == str(out_dir / f"best-{ORDER}.yaml")


@pytest.mark.slow
def test_the_console_shows_trial_progress_and_the_log_file_the_rest(sweep):
    console = sweep["first"].stderr
    first_log = min((sweep["out_dir"] / "logs").glob("run-*.log")).read_text()  # names start with the time
    assert f"log: {sweep['out_dir'] / 'logs'}" in console
    for line in ("2 trials over first-word -> last-word", ": started (", "after task 2, validation AP", "best trial"):
        assert line in console, line
    # Ray's, Tune's and the trials' own lines are in the log file only.
    assert "Started training worker group" in first_log and "Started training worker group" not in console
    assert len(console.splitlines()) < 30, console


@pytest.mark.slow
def test_resume_of_an_interrupted_sweep_keeps_the_finished_trial(interrupted_sweep):
    run = interrupted_sweep
    trials = run["trials"]
    assert len(trials) == 2
    assert all(t["status"] in ("completed", "stopped") and t["error"] is None for t in trials), trials
    # The trial that had finished before the kill was not run again: Tune's reports are what they were,
    # and MLflow holds exactly one run of it.
    kept = run["kept"]
    assert _reports(run["out_dir"])[kept] == run["reports_before"][kept]
    client, experiment_id = _client(run["summary"])
    runs = client.search_runs([experiment_id], f"tags.`sapt.trial` = '{kept}'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    # The other trial's interrupted attempt (if it had opened its run) is closed, not left RUNNING.
    assert not client.search_runs([experiment_id], "attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_every_trial_is_an_mlflow_run_with_per_task_validation_metrics(sweep):
    client, experiment_id = _client(sweep["summary"])
    for trial in sweep["trials"]:
        run = client.get_run(trial["mlflow_run_id"])
        assert run.info.experiment_id == experiment_id
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert (tags["sapt.sweep"], tags["sapt.order"], tags["sapt.trial"]) == (NAME, ORDER, trial["trial"])
        assert params["eval.split"] == "val" and params["mlflow.register_pool"] == "False"
        assert len(client.get_metric_history(run.info.run_id, "a_1_1")) == 1
        assert metrics["a_1_1"] == trial["val_ap_per_task"][0]
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert len(children) == trial["tasks_done"]
        if trial["status"] == "completed":
            assert run.info.status == "FINISHED"
            assert metrics["AP"] == pytest.approx(trial["val_ap"])
            assert metrics["AP"] == pytest.approx((metrics["a_2_1"] + metrics["a_2_2"]) / 2)
        else:
            assert run.info.status == "KILLED" and tags["sapt.sweep_status"] == "stopped"
    assert client.search_registered_models() == []  # trials register nothing


@pytest.mark.slow
def test_sampled_values_differ_and_lie_inside_the_space(sweep):
    space = load_space(SPACE)
    client, _ = _client(sweep["summary"])
    trials = sweep["trials"]
    for dim in space.dimensions:
        values = [t["values"][dim.key] for t in trials]
        assert len(set(values)) == len(values), (dim.key, values)
        assert all(dim.contains(v) for v in values), (dim.key, values)
        for trial in trials:  # what the trial actually ran with
            logged = client.get_run(trial["mlflow_run_id"]).data.params[dim.key]
            assert logged == str(trial["values"][dim.key])


@pytest.mark.slow
def test_best_config_is_the_best_completed_trial_scored_on_test(sweep):
    from sapt.config import load_config

    summary, trials = sweep["summary"], sweep["trials"]
    best_path = Path(sweep["first"].stdout.strip().splitlines()[-1])
    assert best_path == sweep["out_dir"] / f"best-{ORDER}.yaml"
    completed = [t for t in trials if t["status"] == "completed"]
    top = max(t["val_ap"] for t in completed)
    expected = [t for t in completed if t["val_ap"] == top][0]  # ties: the earliest trial
    assert summary["orders"][ORDER]["best"]["trial"] == expected["trial"]
    client, _ = _client(summary)
    assert client.get_run(expected["mlflow_run_id"]).data.metrics["AP"] == pytest.approx(top)

    run = load_config(str(best_path))
    assert run.eval.split == "test"
    assert run.output_dir == "runs/demo-sapt"  # the preset's, not a trial folder
    assert run.order == ["first-word", "last-word"] and run.mlflow.register_pool is None
    chosen = {f"method_args.{k}": v for k, v in run.method_args.items()}
    assert {k: chosen[k] for k in expected["values"]} == expected["values"]
    assert run.method_args["generator_steps"] == 3  # the base config's overrides are kept


def test_bad_space_file_exits_2_naming_file_and_key(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("method_args.kl_weight:\n  loguniform: [0, 10]\n")
    out_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "sapt.cli", "sweep", "demo-sapt", "--space", str(space),
                           "--output", str(out_dir)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "SAPT_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{space}: method_args.kl_weight: loguniform: bounds must be positive" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "text, field, message",
    [
        ("method_args.kl_weight: {gaussian: [0, 1]}", "method_args.kl_weight", "unknown distribution 'gaussian'"),
        ("method_args.kl_weight: {uniform: [3, 1]}", "method_args.kl_weight", "low must be below high"),
        ("method_args.projection_dim: {lograndint: [16.5, 64]}", "method_args.projection_dim", "integers"),
        ("method_args.temperature: {choice: []}", "method_args.temperature", "non-empty list"),
        ("eval.split: {choice: [val, test]}", "eval.split", "set by the sweep"),
        ("method_args.kl_weight: [0.1, 1]", "method_args.kl_weight", "one distribution"),
        ("- method_args.kl_weight", None, "mapping of config keys"),
        ("a: [", None, "invalid YAML"),
    ],
)
def test_space_errors_name_the_file_and_key(tmp_path, text, field, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SaptError) as caught:
        load_space(path)
    assert caught.value.source == str(path) and caught.value.field == field
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text, field, message",
    [
        ("method_args.temperature: {uniform: [-1, 4]}", "method_args.temperature", "greater than 0"),
        ("method_args.kl_wieght: {uniform: [1, 2]}", "method_args.kl_wieght", "unknown key for method sapt-lora"),
        ("method_args.prompt_length: {choice: [5, 10]}", "method_args.prompt_length", "unknown key for method sapt-lora"),
        ("train.lrr: {loguniform: [0.001, 0.1]}", "train.lrr", "unknown config key"),
    ],
)
def test_space_values_the_method_rejects_fail_before_any_trial(tmp_path, text, field, message):
    from sapt.tuning.configs import base_config, check_space

    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SaptError) as caught:
        check_space(load_space(path), base_config("demo-sapt"))
    assert caught.value.source == str(path) and caught.value.field == field
    assert message in str(caught.value)


def test_the_shipped_spaces_fit_their_methods():
    from sapt.tuning.configs import base_config, check_space

    for method in ("sapt-lora", "sapt-prompt"):
        space = load_space(ROOT / "tuning" / f"{method}.yaml")
        check_space(space, base_config("demo-sapt", [f"method={method}"]))
        assert {"method_args.kl_weight", "method_args.temperature", "method_args.projection_dim"} <= set(space.keys)
    main_knobs = {"o-lora": {"method_args.lambda_1", "method_args.lambda_2"}, "replay": {"method_args.memory_fraction"},
                  "l2p": {"method_args.top_n", "method_args.prompt_length", "method_args.pull_weight"},
                  "prog-prompt": {"method_args.prompt_length", "method_args.residual_mlp"},
                  "epi": {"method_args.prefix_length", "method_args.prefix_init"},
                  "lfpt5": {"method_args.lm_weight", "method_args.kd_weight"}}
    for method, knobs in main_knobs.items():
        space = load_space(ROOT / "tuning" / f"{method}.yaml")
        check_space(space, base_config("demo", [f"method={method}"]))
        assert knobs <= set(space.keys)


def test_resume_needs_an_existing_sweep_asked_the_same(tmp_path):
    from sapt.tuning import sweep as sweep_module
    from sapt.tuning.configs import base_config

    with pytest.raises(SaptError, match="no sweep to resume"):
        sweep_module.run_sweep(sweep_module.SweepRequest("demo-sapt", output=str(tmp_path / "none"), resume=True))
    record = {"name": "x", "base": base_config("demo-sapt"), "space": load_space(SPACE).to_json(),
              "orders": {"embedded": "embedded"}, "samples": 2, "concurrent": 1, "seed": 42}
    assert sweep_module._start_or_resume(tmp_path, record, insist=False) == record  # new: sweep.json written
    assert sweep_module._start_or_resume(tmp_path, {**record, "concurrent": 4}, insist=True) == record
    changed = base_config("demo-sapt", ["train.lr=0.01"])
    with pytest.raises(SaptError) as caught:
        sweep_module._start_or_resume(tmp_path, {**record, "base": changed}, insist=False)
    assert caught.value.field == "base.train.lr" and caught.value.source == str(tmp_path / "sweep.json")


@pytest.mark.parametrize("given, order", [("long-3", "long-3"), ("[sst2, rte]", ["sst2", "rte"]),
                                          ("sst2,rte", ["sst2", "rte"])])
def test_order_values(given, order):
    from sapt.tuning.sweep import _parse_order

    assert _parse_order(given) == order


def test_the_command_prints_the_best_path_or_json_for_several_orders(monkeypatch, capsys, tmp_path):
    import argparse

    from sapt.tuning import sweep as sweep_module
    from sapt.tuning.cli import add_sweep_command

    parser = argparse.ArgumentParser(prog="sapt")
    add_sweep_command(parser.add_subparsers(dest="command", required=True))
    asked = []
    best = {"long-3": Path("/s/best-long-3.yaml"), "long-4": Path("/s/best-long-4.yaml")}
    # The orders' data is not here: the plan is the request as given, and the sweep returns `best`.
    monkeypatch.setattr(sweep_module, "plan_sweep", lambda request: asked.append(request) or sweep_module.SweepPlan(
        request, "x", tmp_path / "sweep", {}, None, {}))
    monkeypatch.setattr(sweep_module, "execute_sweep", lambda plan: best)
    args = parser.parse_args(["sweep", "demo-sapt", "--order", "long-3", "--order", "long-4", "--samples", "4",
                              "--set", "seed=1"])
    args.handler(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {k: str(v) for k, v in best.items()}
    assert asked[0].orders == ["long-3", "long-4"] and asked[0].samples == 4 and asked[0].overrides == ["seed=1"]
    assert asked[0].concurrent == 1 and not asked[0].resume
    best.pop("long-4")
    args.handler(args)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "/s/best-long-3.yaml"
