"""`sapt run --resume` after a real kill between tasks: the registry ends exactly as an uninterrupted run's.

Three real `sapt run` processes on the embedded benchmark (2 tasks, SAPT-LoRA with ARM, 2 Ray Train
workers, sqlite MLflow): an uninterrupted reference; a run SIGKILLed (with its whole Ray process tree)
as soon as its first task's pool version is registered; and its `--resume`. Then a second `--resume`,
which must register nothing.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

POOL = "resume-pool"
SETTINGS = [
    "order=[first-word,last-word]", "train.epochs=1", "max_train_per_task=48", "max_eval_per_task=8",
    "val_size=8", "method_args.generator_steps=4", "method_args.generator_max_new_tokens=12",
    f"mlflow.pool_name={POOL}",
]


def _command(out_dir: Path, *extra: str) -> list[str]:
    sets = [x for s in [*SETTINGS, f"output_dir={out_dir}"] for x in ("--set", s)]
    return [sys.executable, "-m", "sapt.cli", "run", "demo-sapt", *sets, *extra]


def _run(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out_dir, *extra), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _registry(out_dir: Path) -> dict:
    """Every version of the pool's three models: (model, version) -> the tags that describe its content."""
    client = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    found = {}
    for name in (POOL, f"{POOL}-blocks", f"{POOL}-router"):
        for v in client.search_model_versions(f"name = '{name}'"):
            found[(name, int(v.version))] = {k: v.tags.get(k) for k in
                                             ("task_index", "sha256", "block_versions", "router_version")}
            found[(name, int(v.version))]["run"] = v.tags.get("source_run_id")
    aliases = client.get_registered_model(POOL).aliases
    return {"versions": found, "aliases": dict(aliases)}


def _kill_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    parent = psutil.Process(proc.pid)
    tree = [parent, *parent.children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    return tree


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reference, resumed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("resumed")
    _run(reference)

    log = (resumed / "killed.log").open("w")
    proc = subprocess.Popen(_command(resumed), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = resumed / "mlflow.db"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.is_file():
                try:
                    if "after-t01" in MlflowClient(f"sqlite:///{db}").get_registered_model(POOL).aliases:
                        break
                except Exception:
                    pass
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be killed between tasks"
        tree = _kill_tree(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    after_kill = _registry(resumed)

    first = _run(resumed, "--resume")
    before_again = _registry(resumed)
    _run(resumed, "--resume")
    return {"reference": reference, "resumed": resumed, "after_kill": after_kill, "first": first,
            "before_again": before_again}


def test_a_kill_between_tasks_leaves_only_finished_tasks_registered(runs):
    after_kill = runs["after_kill"]
    assert sorted(after_kill["versions"]) == [(POOL, 1), (f"{POOL}-blocks", 1), (f"{POOL}-router", 1)]
    assert after_kill["aliases"] == {"after-t01": 1, "newest": 1}


def test_resume_continues_after_the_registered_task_and_ends_as_an_uninterrupted_run(runs):
    assert "resuming run" in runs["first"].stderr and "after task 1" in runs["first"].stderr
    assert "stage 1/2" not in runs["first"].stderr  # task 1 was not trained again
    reference, resumed = _registry(runs["reference"]), _registry(runs["resumed"])
    assert resumed["aliases"] == reference["aliases"] == {"after-t01": 1, "after-t02": 2, "newest": 2}
    assert sorted(resumed["versions"]) == sorted(reference["versions"])  # same versions, no duplicates
    for key, tags in reference["versions"].items():
        same = {k: v for k, v in tags.items() if k != "run"}
        assert {k: v for k, v in resumed["versions"][key].items() if k != "run"} == same, key
    runs_of_resumed = {tags["run"] for tags in resumed["versions"].values()}
    assert len(runs_of_resumed) == 1  # the resumed run continued the interrupted MLflow run


def test_resumed_results_match_the_uninterrupted_run(runs):
    reference = json.loads((runs["reference"] / "results.json").read_text())
    resumed = json.loads((runs["resumed"] / "results.json").read_text())
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["train_attention"] == reference["train_attention"]


def test_resuming_a_finished_run_registers_nothing(runs):
    assert _registry(runs["resumed"]) == runs["before_again"]
