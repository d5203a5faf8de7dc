"""embedded:minilm-t5: pretrained encoder intact, warmed-up decoder cached, LoRA and generation work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file

from sapt.backbones.minilm import (
    WARMUP_STEPS,
    build_minilm_seq2seq,
    build_settings,
    corpus_spec,
    encoder_folder,
    warmup_corpus,
)
from sapt.backbones.warmup import settings_key
from sapt.data.collate import IGNORE_INDEX, Collator
from sapt.data.embedded import VOCABULARY
from sapt.errors import SaptError
from sapt.evaluation.generate import generate_answers

# Each task's words are its own, so a corpus text shows which task (and split) it came from.
TASKS = {
    ("SuperNI", "task001_alpha"): "alpha apple almond",
    ("Long_Sequence", "beta"): "beta bread butter",
    ("Long_Sequence", "gamma"): "gamma garden grape",
}
TEST_WORD = "zebra"  # only in test.json and dev.json files


def _write_task(root: Path, bench: str, name: str, words: str) -> None:
    folder = root / bench / name
    folder.mkdir(parents=True)
    filler = " ".join(words.split() * 8)
    train = [{"input": f"{words} number {i} [x] {filler}", "output": "yes"} for i in range(6)]
    held_out = [{"input": f"{TEST_WORD} {TEST_WORD}", "output": "no"}]
    for split, items in (("train", train), ("dev", held_out), ("test", held_out)):
        doc = {"Definition": [f"Answer about {name}."], "Instances": items}
        (folder / f"{split}.json").write_text(json.dumps(doc))


def _entries(cache: Path) -> list[str]:
    """Cache entry folders (lock files and temporary dot-folders left out)."""
    return sorted(p.name for p in Path(cache).iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cl_benchmark")
    for (bench, name), words in TASKS.items():
        _write_task(root, bench, name, words)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _build(data_dir, cache_dir, exclude=("gamma",)):
    return build_minilm_seq2seq(
        cache_dir=cache_dir,
        data_dir=str(data_dir),
        exclude_tasks=list(exclude),
        warmup_steps=2,
    )


@pytest.fixture(scope="module")
def backbone(data_dir, cache_dir):
    return _build(data_dir, cache_dir)


@pytest.fixture(scope="module")
def tokenizer(backbone):
    return backbone.tokenizer


def test_corpus_holds_only_train_text_of_kept_tasks(data_dir, tokenizer):
    texts = warmup_corpus(data_dir, ["gamma"], tokenizer, seed=0)
    words = {w for text in texts for w in text.split()}
    assert {"alpha", "apple", "beta", "butter"} <= words
    assert not words & {"gamma", "garden", "grape"}  # excluded task
    assert TEST_WORD not in words  # test.json / dev.json never read
    assert all(len(text.split()) <= 16 for text in texts)
    assert not any("[" in text or "]" in text for text in texts)  # the warm-up's span markers
    # Each train input has 3 + 2 + 24 = 29 words (the [x] word dropped): runs of 16 and 13.
    assert len(texts) == 2 * 6 * 2


def test_corpus_without_data_avoids_embedded_vocabulary(tokenizer):
    texts = warmup_corpus(None, (), tokenizer, seed=0)
    words = {w for text in texts for w in text.split()}
    assert len(texts) == 20000
    assert all(4 <= len(text.split()) <= 16 for text in texts)
    assert not words & set(VOCABULARY)
    assert texts == warmup_corpus(None, (), tokenizer, seed=0)


def test_unknown_or_all_excluded_tasks_are_errors(data_dir):
    with pytest.raises(SaptError, match="excluded tasks not found: sst2"):
        corpus_spec(data_dir, ["gamma", "sst2"])
    with pytest.raises(SaptError, match="every task is excluded"):
        corpus_spec(data_dir, ["task001_alpha", "beta", "gamma"])


def test_cache_key_follows_corpus_tasks_and_warmup_settings(data_dir, backbone):
    def key(exclude=("gamma",), steps=2, seed=0):
        settings = build_settings(data_dir=str(data_dir), exclude_tasks=exclude, warmup_steps=steps, seed=seed)
        return settings_key(settings)

    base = key()
    assert backbone.identity == f"embedded:minilm-t5@{base}"
    assert key(exclude=["gamma"]) == base  # a list or a tuple, same tasks
    variants = [key(exclude=["beta"]), key(exclude=()), key(steps=3), key(seed=1)]
    assert len({base, *variants}) == 5
    assert key(exclude=()) != settings_key(
        build_settings(data_dir=None, exclude_tasks=(), warmup_steps=2, seed=0)
    )


def test_warmup_is_step_limited_on_one_thread(data_dir):
    settings = build_settings(data_dir=str(data_dir), exclude_tasks=["gamma"], warmup_steps=WARMUP_STEPS, seed=0)
    assert settings["warmup"]["steps"] == WARMUP_STEPS  # in the cache key
    assert settings["warmup"]["threads"] == 1
    assert not any("second" in k for k in settings["warmup"])  # no wall-clock budget
    with pytest.raises(ValueError, match="warmup_steps"):
        build_minilm_seq2seq(data_dir=str(data_dir), exclude_tasks=["gamma"], warmup_steps=0)


def test_backbone_is_frozen_and_encoder_is_the_pretrained_one(backbone):
    model = backbone.model
    assert backbone.name == "embedded:minilm-t5"
    assert backbone.is_encoder_decoder and backbone.lora_targets == ["query", "value"]
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    stored = load_file(str(encoder_folder() / "model.safetensors"))
    encoder = model.encoder.state_dict()
    compared = [k for k in stored if k in encoder]
    assert len(compared) > 90  # every layer, not a few
    assert all(torch.equal(encoder[k], stored[k]) for k in compared)  # warm-up left it alone
    # Decoder input embedding and output layer are the encoder's word embedding matrix.
    word = model.encoder.embeddings.word_embeddings.weight
    assert model.decoder.bert.embeddings.word_embeddings.weight is word
    assert model.decoder.get_output_embeddings().weight is word
    assert len(model.decoder.bert.encoder.layer) == 2


def test_labels_are_shifted_into_decoder_inputs(backbone):
    tok, model = backbone.tokenizer, backbone.model
    collator = Collator(tok, True, max_source_len=32, max_target_len=8)
    batch = collator.train_batch(["the film was great", "news about a match"], ["positive", "sports news"])
    labels = batch["labels"]
    pos, sports, news = (tok.convert_tokens_to_ids(w) for w in ("positive", "sports", "news"))
    sep, pad, cls = tok.sep_token_id, tok.pad_token_id, tok.cls_token_id
    assert labels.tolist() == [[pos, sep, IGNORE_INDEX], [sports, news, sep]]
    loss = model(**batch).loss
    # By hand: decoder inputs = [CLS] + labels[:-1], -100 read as [PAD]; loss skips -100.
    decoder_input_ids = torch.tensor([[cls, pos, sep], [cls, sports, news]])
    assert pad == 0
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=torch.tensor([[1, 1, 1], [1, 1, 1]]),
    ).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-5)


def test_lora_reaches_encoder_and_decoder_attention_and_generates(data_dir, cache_dir):
    backbone = _build(data_dir, cache_dir)  # its own copy: PEFT edits the model in place
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=backbone.lora_targets, task_type=TaskType.SEQ_2_SEQ_LM
    )
    model = get_peft_model(backbone.model, config)
    adapted = {name for name, _ in model.named_modules() if name.endswith("lora_A")}
    prefix = "base_model.model."
    expected = set()
    for layer in range(6):
        for proj in ("query", "value"):
            expected.add(f"{prefix}encoder.encoder.layer.{layer}.attention.self.{proj}.lora_A")
    for layer in range(2):
        for block in ("attention", "crossattention"):
            for proj in ("query", "value"):
                expected.add(f"{prefix}decoder.bert.encoder.layer.{layer}.{block}.self.{proj}.lora_A")
    assert adapted == expected
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())

    collator = Collator(backbone.tokenizer, True, max_source_len=32, max_target_len=8)
    answers = generate_answers(
        model, collator, ["alpha apple", "beta bread butter"], max_new_tokens=4, device=torch.device("cpu")
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert not any("[CLS]" in a or "[SEP]" in a or "[PAD]" in a for a in answers)
    out = model.generate(
        **collator.generation_batch(["alpha apple"]), max_new_tokens=4, do_sample=False, num_beams=1,
        pad_token_id=collator.pad_id, eos_token_id=collator.eos_id,
    )
    assert out[0, 0].item() == backbone.tokenizer.cls_token_id and out.shape[1] <= 5


def test_second_build_reads_the_cache_instead_of_warming_up(data_dir, cache_dir, backbone, tmp_path):
    key = backbone.identity.split("@")[1]
    entries = _entries(cache_dir)
    assert entries == [f"minilm-t5-{key}"]
    cache_dir = shutil.copytree(cache_dir, tmp_path / "cache")  # a copy: other tests keep theirs
    weights = cache_dir / entries[0] / "model.safetensors"
    stored = load_file(str(weights))
    assert "output_bias" in stored and not any(k.startswith("seq2seq") for k in stored)  # decoder part only
    # Mark the cached weights: a rebuild that warmed up again could not produce this value.
    stored["output_bias"] = torch.full_like(stored["output_bias"], 0.125)
    save_file(stored, str(weights))
    again = _build(data_dir, cache_dir)
    assert torch.all(again.model.decoder.cls.predictions.bias == 0.125)
    assert torch.all(again.model.decoder.cls.predictions.decoder.bias == 0.125)  # still tied
    assert _entries(cache_dir) == entries


def test_load_backbone_passes_data_dir_and_exclusions(data_dir, cache_dir, backbone, tmp_path):
    from sapt.backbones import EMBEDDED_BACKBONES, load_backbone

    assert "embedded:minilm-t5" in EMBEDDED_BACKBONES
    # Pre-fill the entry of the default recipe (WARMUP_STEPS) with the 2-step weights: no warm-up runs.
    settings = build_settings(data_dir=str(data_dir), exclude_tasks=["gamma"], warmup_steps=WARMUP_STEPS, seed=0)
    key = settings_key(settings)
    source = Path(cache_dir) / f"minilm-t5-{backbone.identity.split('@')[1]}"
    shutil.copytree(source, tmp_path / f"minilm-t5-{key}")
    loaded = load_backbone(
        "embedded:minilm-t5", cache_dir=tmp_path, data_dir=str(data_dir), exclude_tasks=["gamma"]
    )
    assert loaded.identity == f"embedded:minilm-t5@{key}"
    assert _entries(tmp_path) == [f"minilm-t5-{key}"]  # read, not warmed up into a second entry
