"""Finding and killing the processes of a `sapt run` subprocess: its Ray Train workers, its whole tree.

Used by the crash tests (test_crash_recovery.py, test_sweep.py). Everything here acts only on
descendants of the run's own process, never on other Ray instances of this shared machine.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil

WORKER_ACTOR = "RayTrainWorker"  # the process title of a Train V2 worker: ray::RayTrainWorker
SNAPSHOT = "checkpoint_manager_snapshot.json"


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def registered_checkpoints(storage: Path, pattern: str = "*") -> set[str]:
    """Checkpoint folder names the Train controller has registered, over every run under storage."""
    names: set[str] = set()
    for snapshot in storage.glob(f"{pattern}/{SNAPSHOT}"):
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


def worker_ranks(stderr: str) -> dict[int, int]:
    """pid -> world rank, from the controller's 'Started training worker group' lines (latest wins)."""
    return {int(pid): int(rank) for pid, rank in re.findall(r"pid=(\d+)\) world_rank=(\d+)", stderr)}


def kill_one_worker(proc: subprocess.Popen, stderr_path: Path, rank: int, timeout: float = 60) -> tuple[int, int | None]:
    """SIGKILLs one Train worker of ``proc`` (the one of ``rank`` when the log names it), retrying until
    one is dead; returns its pid and rank."""
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _train_workers(root)
        ranks = worker_ranks(tail(stderr_path, 10**7))
        preferred = [w for w in workers if ranks.get(w.pid) == rank]
        for victim in (preferred or workers)[:1]:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue  # gone already (Ray replacing the group?): look again
            if _gone(victim, timeout=10):
                return victim.pid, ranks.get(victim.pid)
        time.sleep(0.2)
    raise AssertionError(f"no Ray Train worker of this run could be killed in {timeout}s")


def running(process: psutil.Process) -> bool:
    """Running and not a zombie; is_running() also checks the start time, so never a reused pid."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessTree:
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
        alive = [p for p in self.known.values() if p.pid != self.proc.pid and running(p)]
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


def kill_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILLs ``proc`` and every process below it at once (a crash of the whole run); returns them."""
    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)
    return family
