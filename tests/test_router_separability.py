"""benchmarks/router_separability.py: the router's query input, probed on the embedded benchmark."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_embedded_tasks_are_told_apart_by_their_pooled_embeddings():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "router_separability.py"), "--config", "demo-sapt",
                           "--probe-items", "50"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(re.findall(r"^\| (\S+) \| ([\d.]+) \| [\d.]+ \|$", proc.stdout, re.M))
    assert set(rows) == {"first-word", "last-word", "second-word", "word-before-last", "all"}, proc.stdout
    # The instructions differ, so a linear probe routes (nearly) every test prompt home: demo-sapt's
    # low routing accuracy (docs/sapt.md) comes from how the router trains, not from what it reads.
    assert float(rows["all"]) >= 95, proc.stdout


def test_a_bad_order_exits_naming_the_field():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "router_separability.py"), "--config", "demo-sapt",
                           "--set", "order=[no-such-task]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no-such-task" in proc.stderr, proc.stderr[-2000:]
