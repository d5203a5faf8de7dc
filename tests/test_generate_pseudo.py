"""jobs/generate_pseudo.py: a task's pseudo prompts from its generator, apart from the run.

The generators here are fresh (untrained) LoRA generators on the embedded tiny T5, saved by PEFT: real
adapter files whose samples are noise, enough to check seeding, ordering and the refusals. That a
trained generator gives back exactly a run's memory is checked in test_sapt_end_to_end.py.
"""

import json

import pytest

from jobs.generate_pseudo import main
from sapt.backbones import load_backbone
from sapt.config import load_config
from sapt.methods import build_method
from sapt.methods.pseudo_generator import new_generator

SETS = ["--set", "order=[first-word,last-word]"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    run = load_config("demo-sapt", ["order=[first-word,last-word]"])
    settings = build_method(run.method, run.method_args, run.pet).memory().generator
    folder = tmp_path_factory.mktemp("generator")
    new_generator(load_backbone(run.backbone, exclude_tasks=["first-word", "last-word"]), settings).save_pretrained(folder)
    return folder, settings


def _refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_bad_requests_are_refused_before_any_work(generator, tmp_path, capsys):
    folder, _ = generator
    out = tmp_path / "out.jsonl"
    common = ["--generator", str(folder), "--output", str(out)]
    err = _refused(capsys, "demo", "--task", "first-word", *common)  # SeqLoRA keeps no pseudo samples
    assert "config: method" in err and "seq-lora" in err
    err = _refused(capsys, "demo-sapt", *SETS, "--task", "no-such-task", *common)
    assert "--task" in err and "first-word, last-word" in err
    err = _refused(capsys, "demo-sapt", *SETS, "--task", "first-word", "--count", "0", *common)
    assert "--count" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _refused(capsys, "demo-sapt", *SETS, "--task", "first-word", "--generator", str(empty), "--output", str(out))
    assert str(empty) in err and "adapter_config.json" in err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    err = _refused(capsys, "demo-sapt", *SETS, "--task", "first-word", "--generator", str(pickled), "--output", str(out))
    assert "adapter_model.safetensors" in err
    err = _refused(capsys, "demo-sapt", *SETS, "--task", "first-word", "--generator", "runs:/0123456789abcdef/generators/x",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--output", str(out))
    assert "cannot download the generator" in err
    assert not out.exists()


def test_prompts_depend_on_the_seed_not_on_the_actors(generator, local_ray):
    from peft import PeftModel

    from sapt.cluster.pseudo import generate_pseudo_prompts
    from sapt.methods.pseudo_generator import generator_collator, sample_prompts

    folder, settings = generator
    order = ["first-word", "last-word"]
    spread = generate_pseudo_prompts(backbone="embedded:tiny-t5", data_dir=None, exclude_tasks=order,
                                     generator_path=str(folder), settings=settings, task=1, count=20, seed=7,
                                     real_sources=[], actors=2, batch_size=8)
    # The same three sampling batches (8, 8, 4 prompts) drawn here in one process, one after another.
    backbone = load_backbone("embedded:tiny-t5", exclude_tasks=order)
    model = PeftModel.from_pretrained(backbone.model, str(folder)).eval()
    collator = generator_collator(backbone, settings)
    in_order = [text for start in (0, 8, 16)
                for text in sample_prompts(model, collator, min(8, 20 - start), settings, seed=7 * 100003 + start)]
    assert [r["source"] for r in spread] == [t for t in in_order if t.strip()]
    assert len(spread) >= 15 and all(r["task"] == 1 for r in spread)
    assert len({r["source"] for r in spread}) > 1
    other_seed = sample_prompts(model, collator, 8, settings, seed=8 * 100003)
    assert other_seed != in_order[:8]


def test_the_job_writes_jsonl_rows_like_a_runs_memory(generator, local_ray, tmp_path, capsys):
    folder, _ = generator
    out = tmp_path / "deep" / "first-word.jsonl"
    code = main(["demo-sapt", *SETS, "--set", "max_train_per_task=150", "--task", "last-word",
                 "--generator", str(folder), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert captured.out.strip().splitlines()[-1] == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(rows) <= 7  # as a run keeps: the demo-sapt preset's 5% of 150 training items
    assert all(set(r) == {"task", "source", "target"} and r["task"] == 1 and r["target"] == "" for r in rows)
    assert not list(out.parent.glob("*.partial"))


def test_real_lengths_cut_each_prompt_to_a_length_drawn_from_the_tasks_prompts(generator):
    """generator_lengths real: each pseudo prompt is as long (in tokens) as a real prompt of its task,
    drawn with the batch's seed, not where the generator ends it."""
    from dataclasses import replace

    from peft import PeftModel

    from sapt.methods.pseudo_generator import generator_collator, prompt_lengths, sample_prompts

    folder, settings = generator
    order = ["first-word", "last-word"]
    backbone = load_backbone("embedded:tiny-t5", exclude_tasks=order)
    model = PeftModel.from_pretrained(backbone.model, str(folder)).eval()
    collator = generator_collator(backbone, settings)
    real = ["one two three", "one two three four five six seven eight nine ten eleven twelve"]
    lengths = prompt_lengths(collator, real)
    assert lengths == [len(collator.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in real]
    matched = replace(settings, lengths="real")
    prompts = sample_prompts(model, collator, 12, matched, seed=3, lengths=lengths)
    assert set(prompt_lengths(collator, prompts)) <= set(lengths) and len(set(prompt_lengths(collator, prompts))) == 2
    assert prompts == sample_prompts(model, collator, 12, matched, seed=3, lengths=lengths)
    free = prompt_lengths(collator, sample_prompts(model, collator, 12, settings, seed=3))
    assert max(free) > max(lengths)  # the untrained generator runs on: only the cut makes them short
