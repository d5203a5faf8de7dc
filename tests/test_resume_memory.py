"""What a resumed run remembers: the memory of the registered state it resumes from, never what a later,
unregistered stage wrote before the interruption."""

from sapt.config import load_config
from sapt.registry.tracking import SequenceTracker
from sapt.runner import _keep_memory, _restored_memory, _write_memory

NAMES = ["first-word", "last-word", "second-word"]


def _tracker(tmp_path):
    run = load_config("lfpt5", [f"order=[{','.join(NAMES)}]"])
    return SequenceTracker("", "sapt", tmp_path, run.model_dump(mode="json"), NAMES)


def _rows(task: int, written_after: int) -> list[dict]:
    return [{"task": task, "source": f"input {i} of task {task}, written after stage {written_after}",
             "target": "answer"} for i in range(3)]


def _log(tracker, tmp_path, stage: int, tasks: list[int], self_written: bool) -> None:
    """Stage ``stage`` (1-based) writes and logs memory of ``tasks`` as the runner does."""
    paths = [_write_memory(tmp_path / f"written-{stage}", task, NAMES[task], _rows(task, stage)) for task in tasks]
    _keep_memory(tracker, paths, row=stage - 1, self_written=self_written)


def test_a_resume_reads_the_self_written_memory_of_the_registered_stage_not_a_later_rewrite(tmp_path):
    tracker = _tracker(tmp_path)
    _log(tracker, tmp_path, 1, [0], self_written=True)  # stage 1 registered: its state wrote task 1 again
    _log(tracker, tmp_path, 2, [0, 1], self_written=True)  # stage 2 rewrote tasks 1-2, then the run died
    memory = _restored_memory(tracker, tmp_path / "resume", task_index=0, self_written=True)
    assert memory == {0: _rows(0, 1)}
    later = _restored_memory(tracker, tmp_path / "resume-later", task_index=1, self_written=True)
    assert later == {0: _rows(0, 2), 1: _rows(1, 2)}


def test_a_resume_reads_each_finished_tasks_memory_written_once(tmp_path):
    tracker = _tracker(tmp_path)
    _log(tracker, tmp_path, 1, [0], self_written=False)
    _log(tracker, tmp_path, 2, [1], self_written=False)  # task 2 finished, then the run died before registering
    memory = _restored_memory(tracker, tmp_path / "resume", task_index=0, self_written=False)
    assert memory == {0: _rows(0, 1)}
