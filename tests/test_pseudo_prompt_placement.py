"""benchmarks/pseudo_prompt_placement.py: where a run's pseudo prompts pool, free and cut to real lengths.

The generators are fresh (untrained) LoRA adapters saved by PEFT on the embedded tiny T5: their
prompts are noise of random length (6-22 tokens here where the task's prompts have 15); cut to
real lengths they have the task's length, which is what the script's length columns show. The
placement itself needs a trained run's generators (docs/sapt.md).
"""

import re
import subprocess
import sys
from pathlib import Path

from sapt.backbones import load_backbone
from sapt.config import load_config
from sapt.methods import build_method
from sapt.methods.pseudo_generator import new_generator

ROOT = Path(__file__).parents[1]
ORDER = ["first-word", "last-word"]


def test_real_lengths_make_the_pseudo_prompts_as_long_as_their_tasks_prompts(tmp_path):
    run = load_config("demo-sapt", [f"order=[{','.join(ORDER)}]"])
    settings = build_method(run.method, run.method_args, run.pet).memory().generator
    backbone = load_backbone(run.backbone, exclude_tasks=ORDER)
    new_generator(backbone, settings).save_pretrained(tmp_path / "01-first-word")  # the last task has none
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pseudo_prompt_placement.py"), "--config",
                           "demo-sapt", "--set", f"order=[{','.join(ORDER)}]", "--set", "max_train_per_task=100",
                           "--probe-items", "30", "--generators", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| (\S+) \| (\d+) tok \| (\d+) tok, (\d+)%, (\d+)% \| (\d+) tok, (\d+)%, (\d+)% \|$",
                      proc.stdout, re.M)
    assert [r[0] for r in rows] == ["first-word"], proc.stdout
    real, cut = int(rows[0][1]), int(rows[0][5])
    assert abs(cut - real) <= 1, proc.stdout
    assert "| all |" in proc.stdout


def test_a_missing_generators_folder_is_named(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pseudo_prompt_placement.py"), "--config",
                           "demo-sapt", "--generators", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nowhere" in proc.stderr, proc.stderr[-2000:]
