"""The zero-shot reference row: the bare backbone scored by Ray Data actors on the run's own test items,
as `sapt zero-shot` and benchmarks/compare_methods.py report it."""

import json

import pytest
import torch
from cli_in_process import run_cli

from sapt.backbones import load_backbone
from sapt.config import load_config
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.evaluation.generate import generate_answers
from sapt.evaluation.metrics import score_task

QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
             ("What is the capital of Spain?", "Madrid"), ("What is the capital of Germany?", "Berlin"),
             ("What is the capital of Japan?", "Tokyo"), ("What color is the clear sky on a sunny day?", "blue")]


@pytest.fixture
def capitals(tmp_path):
    """A generation task of one's own (no task.json: Rouge-L, no definition line) that an instruction-tuned
    model answers untrained, if wordily ("The capital of France is Paris.")."""
    folder = tmp_path / "data" / "capitals"
    folder.mkdir(parents=True)
    for split, rows in (("train", QUESTIONS * 2), ("test", QUESTIONS)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in rows))
    return tmp_path / "data"


def test_sapt_zero_shot_scores_the_bare_backbone_on_the_runs_test_items(local_ray, capitals, tmp_path):
    sets = [f"data_dir={capitals}", "order=[capitals]", "backbone=embedded:smollm2-135m", "val_size=2",
            "eval.max_new_tokens=12", f"output_dir={tmp_path / 'out'}"]
    out = run_cli("zero-shot", "demo", *[x for s in sets for x in ("--set", s)])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "zero_shot.json").read_text())
    assert out.stdout.strip().splitlines()[-1].endswith("zero_shot.json")
    # The same items and answers in this process, without Ray: the row is the untrained backbone's.
    run = load_config("demo", sets)
    (task,) = load_tasks(str(capitals), ["capitals"], max_train_per_task=run.max_train_per_task,
                         max_eval_per_task=run.max_eval_per_task, val_size=2, seed=run.seed)
    backbone = load_backbone(run.backbone)
    collator = Collator.for_backbone(backbone, run.train.max_source_len, run.train.max_target_len,
                                     run.train.prompt_format)  # auto: SmolLM2's chat template
    answers = generate_answers(backbone.model, collator, [ex.source for ex in task.test], max_new_tokens=12,
                               device=torch.device("cpu"))
    expected = score_task(task.kind, answers, [ex.references for ex in task.test])
    assert result["scores"] == {"capitals": pytest.approx(expected)} and result["mean"] == pytest.approx(expected)
    assert expected > 10, answers  # a pretrained instruction model knows some capitals untrained
    from mlflow import MlflowClient

    logged = MlflowClient(result["mlflow"]["tracking_uri"]).get_run(result["mlflow"]["run_id"])
    assert logged.data.metrics["score.capitals"] == pytest.approx(expected)
    assert logged.data.tags["sapt.method"] == "zero-shot"
