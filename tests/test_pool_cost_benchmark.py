"""benchmarks/pool_cost.py in a short mode: it runs end to end and prints its tables and verdict."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TOY = ["--blocks", "3", "--batch-size", "2", "--seq-len", "8", "--target-len", "4", "--new-tokens", "2",
       "--iters", "2", "--warmup", "0", "--threads", "1"]


@pytest.mark.slow
def test_pool_cost_runs_in_short_mode():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pool_cost.py"), *TOY], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for row in ("SAPT-LoRA, 3 blocks", "SAPT-LoRA, 1 block", "PEFT LoRA, unmerged", "PEFT LoRA, merged (no adapter)"):
        assert row in out
    assert "train step  3 blocks / 1 block" in out
    assert "\nverdict" in out and "the 1.15x target" in out
