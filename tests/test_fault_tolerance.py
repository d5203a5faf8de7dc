"""Fault tolerance for real: SIGKILL one Ray Train worker mid-task; the stage resumes from its last epoch.

`sapt run demo` (SeqLoRA on two embedded tasks) runs in a subprocess with its own local Ray and
`ray.max_failures=1`. The same run is the suite's SeqLoRA end-to-end check: results.json, learning
then forgetting, and the MLflow runs. As soon as the
Train controller has registered the first epoch checkpoint (it lists it in the run's
checkpoint_manager_snapshot.json, which is what a restarted worker group resumes from), the test
SIGKILLs one `ray::RayTrainWorker` process that descends from that subprocess. The run must still
exit 0 with a learned task, and the new worker group must continue after epoch N >= 1 instead of
starting the task over.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

EPOCHS = 5
KILL_RANK = 1  # rank 0 prints the progress lines; killing rank 1 keeps them intact up to the kill
ARGS = [
    "order=[first-word,last-word]", "num_workers=2", "train.zero_stage=2", f"train.epochs={EPOCHS}",
    # 800 items: 25 steps per epoch (1-5 s on 2 cores). The controller registers a checkpoint at its
    # next 2 s poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); epochs 2-5 leave the kill room after that.
    "max_train_per_task=800", "max_eval_per_task=40", "ray.max_failures=1",
]
WORKER_ACTOR = "RayTrainWorker"  # the process title of a Train V2 worker: ray::RayTrainWorker
SNAPSHOT = "checkpoint_manager_snapshot.json"
FIRST_CHECKPOINT = "epoch-001"  # worker.py: checkpoint_dir_name=f"epoch-{epoch:03d}"
START_TIMEOUT_S = 600  # Ray start-up, worker group start-up and the first epoch
KILL_TIMEOUT_S = 60
RUN_TIMEOUT_S = 900


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _registered_checkpoints(storage: Path) -> set[str]:
    """Checkpoint folder names the Train controller has registered, over every run under storage."""
    names: set[str] = set()
    for snapshot in storage.glob(f"*/{SNAPSHOT}"):
        try:  # written in place by the controller: a read can catch it half-written
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            continue
        names.update(r["checkpoint_dir_name"] for r in state.get("checkpoint_results", []))
    return names


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    """Live Ray Train workers among root's descendants: only the Ray instance root started."""
    found = []
    for child in root.children(recursive=True):
        try:
            if any(WORKER_ACTOR in part for part in child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def _gone(process: psutil.Process, timeout: float) -> bool:
    """Dead or a zombie: its parent, the raylet, reaps it, not us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _worker_ranks(stderr: str) -> dict[int, int]:
    """pid -> world rank, from the controller's 'Started training worker group' lines (latest wins)."""
    return {int(pid): int(rank) for pid, rank in re.findall(r"pid=(\d+)\) world_rank=(\d+)", stderr)}


def _kill_one_worker(proc: subprocess.Popen, stderr_path: Path) -> tuple[int, int | None]:
    """SIGKILLs one Train worker (rank KILL_RANK when the log names it); retries until one is dead."""
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _train_workers(root)
        ranks = _worker_ranks(_tail(stderr_path, 10**7))
        preferred = [w for w in workers if ranks.get(w.pid) == KILL_RANK]
        for victim in (preferred or workers)[:1]:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue  # gone already (Ray replacing the group?): look again
            if _gone(victim, timeout=10):
                return victim.pid, ranks.get(victim.pid)
        time.sleep(0.2)
    raise AssertionError(f"no Ray Train worker of this run could be killed in {KILL_TIMEOUT_S}s")


def _running(process: psutil.Process) -> bool:
    """Running and not a zombie; is_running() also checks the start time, so never a reused pid."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Tree:
    """The driver subprocess and every process it started (its local Ray), recorded while it runs,
    so that a failed test can end them all by pid even after the driver itself is gone."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.known: dict[int, psutil.Process] = {}
        self.record()

    def record(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            for process in [root, *root.children(recursive=True)]:
                self.known.setdefault(process.pid, process)
        except psutil.Error:
            pass

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            self.record()
            time.sleep(1)

    def stop(self) -> list[int]:
        """Ends whatever is still running; returns the pids it had to kill."""
        self.record()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # lets Ray shut its own processes down first
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        alive = [p for p in self.known.values() if p.pid != self.proc.pid and _running(p)]
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return [p.pid for p in alive]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fault")
    storage = out_dir / "ray"  # runner: ray.storage_path empty -> output_dir/ray/<run>-stageNN
    stdout_path, stderr_path = out_dir.parent / "fault.stdout", out_dir.parent / "fault.stderr"
    command = [sys.executable, "-m", "sapt.cli", "run", "demo",
               *[x for a in [*ARGS, f"output_dir={out_dir}"] for x in ("--set", a)]]
    started = time.monotonic()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr)
    tree = _Tree(proc)
    try:
        polls = 0
        while FIRST_CHECKPOINT not in _registered_checkpoints(storage):
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {FIRST_CHECKPOINT}:\n" + _tail(stderr_path)
            assert time.monotonic() - started < START_TIMEOUT_S, f"no {FIRST_CHECKPOINT} in {START_TIMEOUT_S}s:\n" + _tail(stderr_path)
            polls += 1
            if polls % 20 == 0:
                tree.record()
            time.sleep(0.1)
        registered_at_kill = _registered_checkpoints(storage)
        assert "final" not in registered_at_kill, "the stage finished before the kill: lengthen the epochs"
        killed_pid, killed_rank = _kill_one_worker(proc, stderr_path)
        killed_at = time.monotonic() - started
        try:
            tree.wait(timeout=max(1.0, RUN_TIMEOUT_S - killed_at))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run still going after {RUN_TIMEOUT_S}s:\n" + _tail(stderr_path)) from None
    finally:
        leftovers = tree.stop()
    seconds = time.monotonic() - started
    print(f"killed pid {killed_pid} (rank {killed_rank}) at {killed_at:.0f}s; run took {seconds:.0f}s; "
          f"left running after the driver: {leftovers}")
    return {
        "returncode": proc.returncode, "stdout": stdout_path.read_text(), "stderr": stderr_path.read_text(),
        "out_dir": out_dir, "killed_pid": killed_pid, "killed_rank": killed_rank,
        "registered_at_kill": registered_at_kill,
    }


def test_run_survives_a_killed_worker(killed_run):
    assert killed_run["returncode"] == 0, killed_run["stderr"][-6000:]
    # The victim was one of this run's Train workers, as the controller reported them.
    assert killed_run["killed_pid"] in _worker_ranks(killed_run["stderr"]), killed_run["killed_pid"]
    # The controller replaced the worker group (max_failures=1 allows exactly one replacement).
    assert killed_run["stderr"].count("Started training worker group of size 2") >= 2
    last = killed_run["stdout"].strip().splitlines()[-1]
    assert last == str(killed_run["out_dir"] / "results.json")


def test_seq_lora_learns_each_task_then_forgets_the_first_despite_the_kill(killed_run):
    results = json.loads((killed_run["out_dir"] / "results.json").read_text())
    a = results["matrix"]
    assert results["order"] == ["first-word", "last-word"] and results["method"] == "seq-lora"
    # An untrained LoRA scores about 0 and any fixed word under 15; uninterrupted runs reach 100.
    assert a[0][0] >= 80, a
    assert a[0][1] is None and a[1][1] >= 40, a  # the continuing LoRA learns its second task more slowly
    assert a[1][0] < a[0][0] - 20, a  # sequential LoRA overwrote task 1
    assert set(results["metrics"]) == {"AP", "F.Ra", "FWT", "BWT"}
    assert results["metrics"]["F.Ra"] == pytest.approx(a[0][0] - a[1][0])


def test_mlflow_holds_a_parent_and_one_nested_run_per_task(killed_run):
    results = json.loads((killed_run["out_dir"] / "results.json").read_text())
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


def test_the_new_worker_group_resumes_after_the_last_checkpoint(killed_run):
    stderr = killed_run["stderr"]
    resumed = [int(n) for n in re.findall(r"\] resumed after epoch (\d+)", stderr)]
    assert resumed, "no worker group resumed from a checkpoint:\n" + stderr[-6000:]
    # One restart; Train V2's print patch can log a line twice, so compare the distinct values.
    assert len(set(resumed)) == 1, resumed
    after = resumed[0]
    # It resumed from a checkpoint at least as recent as the one registered when the worker died.
    registered = max(int(n[len("epoch-"):]) for n in killed_run["registered_at_kill"] if n.startswith("epoch-"))
    assert 1 <= registered <= after <= EPOCHS, (registered, after)
    # And trained on from there: its first progress line is epoch after+1, never epoch 1 again.
    tail = stderr[stderr.index(f"resumed after epoch {after}"):]
    epochs_after = [int(n) for n in re.findall(rf"\[stage 1/2 [^\]]*\] epoch (\d+)/{EPOCHS} step", tail)]
    if after < EPOCHS:
        assert epochs_after and epochs_after[0] == after + 1, epochs_after
    assert all(n > after for n in epochs_after), epochs_after


def test_the_stage_history_covers_every_epoch_once(killed_run):
    final = next((killed_run["out_dir"] / "ray").glob("*-stage01/final"))
    history = json.loads((final / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)), history
