"""What `sapt run` shows on the terminal: our progress and results; everything else into a log file.

Ray forwards every worker's and actor's output to the driver's stdout and stderr, and DeepSpeed,
MLflow and the libraries' warnings write there too, from Python and from C++. ``Console`` points
file descriptors 1 and 2 of the process (and of every process it starts) at a pipe whose reader
copies all of it into ``output_dir/logs/run-*.log``, and also to the terminal with ``verbose``. Our
own lines go to the terminal through a copy of the original stderr: stage bars (``StageBars``),
log records marked ``extra={"console": True}``, warnings of our own loggers.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

CONSOLE = "console"  # log records with extra={"console": True} are shown on the terminal too
_PHASES = {"train": ("train", "step"), "eval": ("eval", "item"), "generator": ("generator", "step")}


def log_path(output_dir: str | os.PathLike) -> Path:
    """A new log file for one invocation, under ``output_dir/logs`` (a resume keeps the earlier ones)."""
    return Path(output_dir) / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class Console:
    """Context manager: while open, descriptors 1 and 2 feed ``path``; ``err`` still reaches the terminal.

    Args:
        path: the log file (its folder is created).
        verbose: copy the captured output to the terminal as well.
    """

    def __init__(self, path: Path, *, verbose: bool = False):
        self.path, self.verbose = path, verbose
        self.err: TextIO = sys.stderr
        self._saved: dict[int, int] = {}
        self._reader: threading.Thread | None = None
        self._handler: logging.Handler | None = None

    def __enter__(self) -> Console:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.err = _terminal_copy(sys.stderr, 2)
        log_file = open(self.path, "ab", buffering=0)
        read_end, write_end = os.pipe()
        _flush()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
        os.close(write_end)
        echo = os.dup(self._saved[2]) if self.verbose else None  # the reader's own: it may outlive __exit__
        self._reader = threading.Thread(target=_copy, args=(read_end, log_file, echo), name="sapt-log", daemon=True)
        self._reader.start()
        if not self.verbose:  # verbose echoes every record already
            self._handler = logging.StreamHandler(self.err)
            self._handler.addFilter(_for_terminal)
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        _flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        # Processes started meanwhile (a local Ray) may still hold the pipe; their late lines are
        # copied for as long as this process lives.
        if self._reader is not None:
            self._reader.join(timeout=1.0)
        if self.err is not sys.stderr:
            self.err.flush()


def _for_terminal(record: logging.LogRecord) -> bool:
    return bool(getattr(record, CONSOLE, False)) or (
        record.levelno >= logging.WARNING and record.name.split(".")[0] == "sapt")


def _terminal_copy(stream: TextIO, fd: int) -> TextIO:
    """A stream on a copy of ``fd`` when ``stream`` writes to it, so it keeps reaching the terminal
    after ``fd`` is redirected; ``stream`` itself otherwise (a test's in-memory capture)."""
    try:
        if stream.fileno() != fd:
            return stream
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return stream
    return open(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace", closefd=True)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass


def _copy(read_end: int, log_file, echo_fd: int | None) -> None:
    while chunk := os.read(read_end, 1 << 16):
        log_file.write(chunk)
        if echo_fd is not None:
            try:
                os.write(echo_fd, chunk)
            except OSError:  # the terminal went away: the log still gets everything
                echo_fd = None
    os.close(read_end)
    log_file.close()
    if echo_fd is not None:
        os.close(echo_fd)


class StageBars:
    """Renders the runner's progress events: one bar per stage phase (train, eval, generator).

    On a terminal the bars redraw in place (steps, loss, tokens/s, time left); elsewhere (a pipe,
    CI, ``verbose``) each phase prints one line when it ends.

    Args:
        stream: where they go (``Console.err``).
        bars: draw live bars; default: when ``stream`` is a terminal.
        intro: a line to write before the first event's output.
    """

    def __init__(self, stream: TextIO, *, bars: bool | None = None, intro: str | None = None):
        self.stream, self._intro = stream, intro
        self.bars = stream.isatty() if bars is None else bars
        self._label = ""
        self._phase: str | None = None
        self._bar: tqdm | None = None
        self._last: dict = {}
        self._started = 0.0

    def __call__(self, event: dict) -> None:
        if self._intro is not None:
            self._write(self._intro)
            self._intro = None
        kind = event.get("event")
        if kind == "stage":
            self._end_phase()
            self._label = event["label"]
        elif kind == "work":
            self._work(event)
        elif kind in ("scores", "note"):
            self._end_phase()
            self._write(event["text"])

    def close(self) -> None:
        self._end_phase()

    def _work(self, event: dict) -> None:
        phase = event["phase"]
        if phase != self._phase:
            self._end_phase()
            self._phase, self._started = phase, time.monotonic()
            if self.bars:
                name, unit = _PHASES.get(phase, (phase, "step"))
                self._bar = tqdm(total=event.get("total"), desc=f"{self._label} {name}", unit=unit, file=self.stream,
                                 dynamic_ncols=True, leave=True, mininterval=0.5)
        self._last = event
        if self._bar is not None:
            if event.get("total") and self._bar.total != event["total"]:
                self._bar.total = event["total"]
            self._bar.n = event.get("done", 0)
            self._bar.set_postfix_str(_postfix(event), refresh=False)
            self._bar.refresh()

    def _end_phase(self) -> None:
        if self._phase is None:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            name, unit = _PHASES.get(self._phase, (self._phase, "step"))
            done, total = self._last.get("done", 0), self._last.get("total")
            count = f"{done}/{total}" if total else f"{done}"
            extra = _postfix(self._last)
            self._write(f"{self._label} {name}: {count} {unit}s{', ' + extra if extra else ''}, "
                        f"{time.monotonic() - self._started:.0f} s")
        self._phase, self._last = None, {}

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


def _postfix(event: dict) -> str:
    parts = []
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if event.get("tokens_per_second"):
        parts.append(f"{event['tokens_per_second']:,.0f} tok/s/worker")
    if event.get("epoch"):
        parts.append(f"epoch {event['epoch']}/{event['epochs']}")
    return ", ".join(parts)
