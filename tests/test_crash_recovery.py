"""Crashes of a real SAPT run end with the registry an uninterrupted run writes.

Real `sapt run` processes on the embedded benchmark (2 tasks, SAPT-LoRA with ARM, 2 Ray Train workers
on DeepSpeed, sqlite MLflow), all with the same settings:
- an uninterrupted reference;
- a run SIGKILLed, with its whole Ray process tree, as soon as its first task's pool version is
  registered;
- its `--resume`, which loses one Ray Train worker (SIGKILL) in the middle of task 2, after the Train
  controller has registered an epoch checkpoint. Ray Train replaces the worker group
  (`ray.max_failures=1`), which resumes from that epoch with the checkpoint's random state;
- a second `--resume`, which must register nothing.
Every artifact of every registered version (sha256) must equal the reference's.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray_processes import ProcessTree, kill_one_worker, kill_tree, registered_checkpoints, tail

pytestmark = pytest.mark.slow

POOL = "resume-pool"
EPOCHS = 5
SETTINGS = [
    # 160 items: 10 steps per worker and epoch, so task 2 has epochs left after the controller has
    # registered its first checkpoint (it looks every 2 s) and the test has killed a worker.
    "order=[first-word,last-word]", f"train.epochs={EPOCHS}", "max_train_per_task=160", "max_eval_per_task=8",
    "val_size=8", "method_args.generator_steps=4", "method_args.generator_max_new_tokens=12",
    f"mlflow.pool_name={POOL}", "ray.max_failures=1",
    # The query center is set by task 2's start-of-task pass, which a resumed stage skips: the
    # engine checkpoint must carry it, or the saved router differs from the reference's.
    "method_args.query_center=stream",
]
RESUMED_RUN = "*-from-t02"  # the Ray Train run of the --resume: stage 2 onwards
SECOND_EPOCH_ONE, SECOND_FINAL = "stage-02-epoch-001", "stage-02-final"


def _command(out_dir: Path, *extra: str) -> list[str]:
    sets = [x for s in [*SETTINGS, f"output_dir={out_dir}"] for x in ("--set", s)]
    # --verbose: the workers' own lines (ranks, resumed epochs) reach stderr, where the test reads them.
    return [sys.executable, "-m", "sapt.cli", "run", "demo-sapt", "--verbose", *sets, *extra]


def _run(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out_dir, *extra), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _registry(out_dir: Path) -> dict:
    """Every version of the pool's three models: (model, version) -> the tags that describe its content."""
    client = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    found = {}
    for name in (POOL, f"{POOL}-blocks", f"{POOL}-state"):
        for v in client.search_model_versions(f"name = '{name}'"):
            found[(name, int(v.version))] = {k: v.tags.get(k) for k in
                                             ("task_index", "sha256", "block_versions", "state_version")}
            found[(name, int(v.version))]["run"] = v.tags.get("source_run_id")
    aliases = client.get_registered_model(POOL).aliases
    return {"versions": found, "aliases": {k: int(v) for k, v in aliases.items()}}


def _content(registry: dict) -> dict:
    """The registry without the source run ids, which differ between runs by design."""
    return {"aliases": registry["aliases"],
            "versions": {key: {k: v for k, v in tags.items() if k != "run"} for key, tags in registry["versions"].items()}}


def _stage_losses(out_dir: Path) -> list[list[float]]:
    """Task 2's per-epoch loss curves, from the history in its kept final checkpoint."""
    history = json.loads(next((out_dir / "ray").glob("*-after-t02/history.json")).read_text())
    return [h["losses"] for h in history]


def _has_alias(db: Path, model: str, alias: str) -> bool:
    """Whether the run's registry already holds the alias, read without MLflow: an MlflowClient on a
    store the run is still creating would run MLflow's schema migration a second time beside the
    run's own, and the run would fail on the half-migrated tables."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as connection:
            rows = connection.execute("SELECT 1 FROM registered_model_aliases WHERE name = ? AND alias = ?",
                                      (model, alias)).fetchall()
    except sqlite3.Error:  # no file or table yet, or locked by a writer: ask again
        return False
    return bool(rows)


def _kill_between_tasks(out_dir: Path) -> dict:
    """Starts the run and SIGKILLs its whole process tree once task 1's pool version exists."""
    log = (out_dir / "killed.log").open("w")
    proc = subprocess.Popen(_command(out_dir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = out_dir / "mlflow.db"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            # `newest` is the registration's last write (after after-t01): killing on the first alias
            # could land between the two.
            if _has_alias(db, POOL, "after-t01") and _has_alias(db, POOL, "newest"):
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be killed between tasks"
        tree = kill_tree(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return _registry(out_dir)


def _resume_losing_a_worker_in_task_two(out_dir: Path) -> dict:
    """``--resume``; once task 2 has a registered epoch checkpoint, SIGKILLs one of its Train workers."""
    stdout_path, stderr_path = out_dir / "resume.stdout", out_dir / "resume.stderr"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(_command(out_dir, "--resume"), stdout=stdout, stderr=stderr)
    tree = ProcessTree(proc)
    storage = out_dir / "ray"
    deadline = time.monotonic() + 600
    try:
        while SECOND_EPOCH_ONE not in registered_checkpoints(storage, RESUMED_RUN):
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before task 2's first checkpoint:\n" + tail(stderr_path)
            assert time.monotonic() < deadline, "task 2 registered no checkpoint in 600 s:\n" + tail(stderr_path)
            tree.record()
            time.sleep(0.1)
        registered_at_kill = registered_checkpoints(storage, RESUMED_RUN)
        assert SECOND_FINAL not in registered_at_kill, "task 2 finished before the kill: lengthen its epochs"
        kill_one_worker(proc, stderr_path, rank=1)
        tree.wait(timeout=600)
    finally:
        tree.stop()
    assert proc.returncode == 0, tail(stderr_path)
    return {"stderr": stderr_path.read_text(), "registered_at_kill": registered_at_kill}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reference, crashed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("crashed")
    _run(reference)
    after_kill = _kill_between_tasks(crashed)
    resume = _resume_losing_a_worker_in_task_two(crashed)
    before_again = _registry(crashed)
    _run(crashed, "--resume")
    return {"reference": reference, "crashed": crashed, "after_kill": after_kill, "resume": resume,
            "before_again": before_again}


def test_a_kill_between_tasks_leaves_only_finished_tasks_registered(runs):
    after_kill = runs["after_kill"]
    assert sorted(after_kill["versions"]) == [(POOL, 1), (f"{POOL}-blocks", 1), (f"{POOL}-state", 1)]
    assert after_kill["aliases"] == {"after-t01": 1, "newest": 1}


def test_resume_continues_after_the_registered_task(runs):
    stderr = runs["resume"]["stderr"]
    assert "resuming run" in stderr and "after task 1" in stderr
    assert "stage 1/2" not in stderr  # task 1 was not trained again
    resumed = _registry(runs["crashed"])
    assert len({tags["run"] for tags in resumed["versions"].values()}) == 1  # it continued the killed MLflow run


def test_a_worker_lost_mid_task_costs_only_the_epochs_since_the_last_checkpoint(runs):
    stderr = runs["resume"]["stderr"]
    assert stderr.count("Started training worker group of size 2") >= 2  # task 2, then task 2 again
    resumed = {int(n) for n in re.findall(r"\[stage 2/2 [^\]]*\] resumed after epoch (\d+)", stderr)}
    registered = max(int(n.rsplit("-", 1)[1]) for n in runs["resume"]["registered_at_kill"]
                     if n.startswith("stage-02-epoch-"))
    assert len(resumed) == 1 and registered <= min(resumed) < EPOCHS, (resumed, registered)
    # The restarted group trained only the epochs after its checkpoint: task 2's history has each once.
    assert len(_stage_losses(runs["crashed"])) == EPOCHS


def test_after_both_crashes_the_registry_is_the_uninterrupted_runs(runs):
    reference, crashed = runs["reference"], runs["crashed"]
    assert _registry(reference)["aliases"] == {"after-t01": 1, "after-t02": 2, "newest": 2}
    # Same data order and random draws after the restart: the same loss at every step of task 2 ...
    assert _stage_losses(crashed) == _stage_losses(reference)
    # ... so the same weights: the same versions, each artifact with the reference's sha256.
    assert _content(_registry(crashed)) == _content(_registry(reference))


def test_after_both_crashes_the_results_are_the_uninterrupted_runs(runs):
    ours, theirs = (json.loads((folder / "results.json").read_text()) for folder in (runs["crashed"], runs["reference"]))
    assert ours["matrix"] == theirs["matrix"]
    assert ours["metrics"] == theirs["metrics"]
    assert ours["train_attention"] == theirs["train_attention"]


def test_resuming_a_finished_run_registers_nothing(runs):
    assert _registry(runs["crashed"]) == runs["before_again"]
