"""The quiet console: other output (every descriptor, child processes too) into the log, ours on the terminal."""

import io
import subprocess
import sys
import textwrap

import pytest

from sapt.console import StageBars

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys
    from pathlib import Path
    from sapt.console import Console

    logging.basicConfig(level="INFO", stream=sys.stderr)
    console = Console(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose")
    with console:
        print("noise on stdout")
        os.write(2, b"noise on descriptor 2\\n")  # C++ code writes like this
        subprocess.run(["sh", "-c", "echo noise of a child process"], check=True)
        logging.getLogger("ray.train").warning("noise from a library logger")
        logging.getLogger("sapt.runner").info("a plain record of ours")
        logging.getLogger("sapt.runner").info("a record for the terminal", extra={"console": True})
        print("our bar line", file=console.err, flush=True)
    print("results path")
""")
NOISE = ["noise on stdout", "noise on descriptor 2", "noise of a child process", "noise from a library logger",
         "a plain record of ours"]


def _run(tmp_path, mode):
    log = tmp_path / "logs" / "run.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc, log.read_text()


def test_quiet_the_terminal_gets_only_our_lines_and_the_log_gets_everything(tmp_path):
    proc, log = _run(tmp_path, "quiet")
    terminal = proc.stdout + proc.stderr
    for line in NOISE:
        assert line in log, line
        assert line not in terminal, line
    assert "a record for the terminal" in proc.stderr and "our bar line" in proc.stderr
    assert proc.stdout.strip().splitlines() == ["results path"]  # the machine-readable last line stays on stdout


def test_verbose_shows_everything_and_still_logs_it(tmp_path):
    proc, log = _run(tmp_path, "verbose")
    for line in NOISE:
        assert line in log and line in proc.stderr, line
    assert proc.stdout.strip().splitlines() == ["results path"]


def _stage(bars, label, steps, loss):
    bars({"event": "stage", "label": label})
    for done in range(0, steps + 1, 10):
        bars({"event": "work", "phase": "train", "done": done, "total": steps, "loss": loss,
              "tokens_per_second": 1234.0, "epoch": 1, "epochs": 1})
    bars({"event": "work", "phase": "eval", "done": 40, "total": 40})


def test_without_a_terminal_each_phase_ends_in_one_line():
    stream = io.StringIO()
    bars = StageBars(stream, intro="log: runs/x/logs/run.log")  # not a terminal: no redrawn bars
    _stage(bars, "stage 1/2 first-word", 30, 0.5)
    bars({"event": "scores", "text": "after first-word: first-word 100.0"})
    _stage(bars, "stage 2/2 last-word", 20, 0.25)
    bars.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "log", "stage 1/2 first-word train", "stage 1/2 first-word eval", "after first-word",
        "stage 2/2 last-word train", "stage 2/2 last-word eval"]
    assert lines[1].startswith("stage 1/2 first-word train: 30/30 steps, loss 0.5000, 1,234 tok/s/worker")
    assert lines[5].startswith("stage 2/2 last-word eval: 40/40 items")


@pytest.mark.parametrize("total", [None, 50])
def test_bars_follow_the_newest_snapshot(total):
    stream = io.StringIO()
    bars = StageBars(stream, bars=True)
    bars({"event": "stage", "label": "stage 1/1 first-word"})
    bars({"event": "work", "phase": "train", "done": 20, "total": total, "loss": 1.0})
    assert bars._bar.n == 20 and bars._bar.total == total
    bars({"event": "work", "phase": "train", "done": 50, "total": 50, "loss": 0.1})
    assert bars._bar.n == 50 and bars._bar.total == 50  # a total learned after the first epoch
    bars.close()
    assert "stage 1/1 first-word train" in stream.getvalue() and "loss 0.1000" in stream.getvalue()
