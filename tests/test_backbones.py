"""Backbone loaders: embedded tiny models, the warm-up cache, and HF models saved to a folder."""

import dataclasses
import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from sapt.backbones import EMBEDDED_BACKBONES, load_backbone
from sapt.backbones.hub import lora_targets_for
from sapt.backbones.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TinySpec,
    backbone_from_spec,
    build_model,
    embedded_tokenizer,
)
from sapt.backbones.warmup import (
    _batch,
    _causal_span_loss,
    cache_root,
    cached_weights,
    span_reconstruction_warmup,
)
from sapt.data.embedded import VOCABULARY, build_task
from sapt.errors import SaptError

# Small specs: same code paths as the registered ones, a fraction of the cost.
SMALL_T5 = TinySpec(name="small-t5", arch="t5", d_model=32, layers=1, warmup_steps=5)
SMALL_LLAMA = TinySpec(name="small-llama", arch="llama", d_model=32, layers=1, warmup_steps=5)


def no_warm_up_calls():
    calls = []

    def warm_up(model):
        calls.append(model)

    return calls, warm_up


@pytest.fixture(scope="module", params=["embedded:tiny-t5", "embedded:tiny-llama"])
def embedded(request, tmp_path_factory):
    """A registered embedded backbone loaded through ``load_backbone``: from the shipped weights, in
    seconds, with nothing written to the cache (the real warm-up is exercised by the slow test)."""
    cache = tmp_path_factory.mktemp("cache")
    backbone = load_backbone(request.param, cache_dir=cache)
    assert list(cache.iterdir()) == []
    return backbone


def test_registry_lists_the_embedded_backbones():
    assert {"embedded:tiny-t5", "embedded:tiny-llama"} <= set(EMBEDDED_BACKBONES)


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(SaptError) as info:
        load_backbone("embedded:tiny-gpt")
    assert info.value.source == "backbone"
    assert "embedded:tiny-t5" in str(info.value)


def test_embedded_backbone_is_frozen_and_generates(embedded):
    model, tok = embedded.model, embedded.tokenizer
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert embedded.identity.startswith(embedded.name + "@")
    batch = tok(["Which word comes first in this list?\napple river horse chair cloud\nOutput: ", "hi"],
                padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}  # no token_type_ids: T5/LLaMA reject them
    out = model.generate(**batch, min_new_tokens=3, max_new_tokens=3, do_sample=False)  # warmed up: it may end early
    if embedded.is_encoder_decoder:
        assert out.shape == (2, 4) and (out[:, 0] == PAD_ID).all()  # decoder starts from [PAD]
    else:
        assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert all(isinstance(text, str) for text in tok.batch_decode(out, skip_special_tokens=True))


def test_lora_targets_name_real_modules(embedded):
    config = LoraConfig(r=8, lora_alpha=32, target_modules=embedded.lora_targets)
    peft_model = get_peft_model(embedded.model, config)
    adapted = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    if embedded.is_encoder_decoder:
        # 2 encoder layers x self-attention + 2 decoder layers x (self + cross) = 6 attentions, q and v each.
        assert len(adapted) == 12
        assert sum("EncDecAttention" in name for name in adapted) == 4
    else:
        assert len(adapted) == 4 * 2  # 4 layers, q_proj and v_proj
    assert {name.rsplit(".", 1)[1] for name in adapted} == set(embedded.lora_targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("causal", [False, True])
def test_tokenizer_family_conventions(causal):
    tok = embedded_tokenizer(causal=causal)
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    apple = tok.convert_tokens_to_ids("apple")
    if causal:
        assert tok("apple")["input_ids"] == [BOS_ID, apple]  # LLaMA: bos first, no eos
        assert tok.padding_side == "left"
    else:
        assert tok("apple")["input_ids"] == [apple, EOS_ID]  # T5: eos appended, no bos
        assert tok.padding_side == "right"
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD_ID, EOS_ID)
    assert tok.decode([PAD_ID, apple, EOS_ID], skip_special_tokens=True) == "apple"


def test_t5_special_ids_match_the_tokenizer():
    model = build_model(SMALL_T5)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id) == (
        PAD_ID, EOS_ID, PAD_ID)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = build_model(SMALL_T5).state_dict()
    assert torch.equal(torch.rand(3), expected)
    second = build_model(SMALL_T5).state_dict()
    other = build_model(dataclasses.replace(SMALL_T5, seed=1)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["shared.weight"], other["shared.weight"])


def test_identity_follows_the_spec(tmp_path):
    _, warm_up = no_warm_up_calls()
    one = backbone_from_spec(SMALL_T5, cache_dir=tmp_path, warm_up=warm_up)
    other = dataclasses.replace(SMALL_T5, warmup_steps=6)
    two = backbone_from_spec(other, cache_dir=tmp_path, warm_up=warm_up)
    assert one.identity != two.identity
    assert one.identity == backbone_from_spec(SMALL_T5, cache_dir=tmp_path, warm_up=warm_up).identity


# ---- warm-up cache ----

def test_cache_round_trip_reads_instead_of_warming_up(tmp_path):
    calls = []

    def warm_up(model):
        calls.append(1)
        with torch.no_grad():
            model.shared.weight.add_(0.5)  # tied to lm_head: one tensor in the file
            model.encoder.final_layer_norm.weight.mul_(3.0)

    settings = {"steps": 5}
    first = cached_weights("small-t5", "abc123", lambda: build_model(SMALL_T5), warm_up,
                           settings=settings, cache_dir=tmp_path)
    entry = tmp_path / "small-t5-abc123"
    assert sorted(p.name for p in entry.iterdir()) == ["model.safetensors", "warmup.json"]
    meta = json.loads((entry / "warmup.json").read_text())
    assert (meta["key"], meta["settings"]) == ("abc123", settings)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    second = cached_weights("small-t5", "abc123", lambda: build_model(SMALL_T5), warm_up,
                            settings=settings, cache_dir=tmp_path)
    assert calls == [1]
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(second.encoder.final_layer_norm.weight, torch.full((32,), 3.0))
    assert second.lm_head.weight is second.shared.weight  # tying survives the load


def test_unreadable_cache_entry_is_a_clear_error(tmp_path):
    entry = tmp_path / "small-t5-bad"
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SaptError) as info:
        cached_weights("small-t5", "bad", lambda: build_model(SMALL_T5), lambda m: None, cache_dir=tmp_path)
    assert info.value.source == str(entry)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAPT_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SAPT_CACHE_DIR")
    assert cache_root().parts[-3:] == (".cache", "sapt", "backbones")


# ---- warm-up objective ----

@pytest.mark.parametrize("spec", [SMALL_T5, SMALL_LLAMA], ids=["t5", "llama"])
def test_warmup_trains_all_but_the_embedding_and_learns(spec):
    causal = spec.arch == "llama"
    tok = embedded_tokenizer(causal=causal)
    model = build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["alpha beta gamma", "delta epsilon"]  # two texts: quickly memorised
    losses = span_reconstruction_warmup(model, tok, texts, is_encoder_decoder=not causal, steps=40,
                                        seed=0, batch_size=8, lr=3e-3, train_embeddings=False)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0
    assert not model.training
    after = model.state_dict()
    embed = "shared.weight" if not causal else "model.embed_tokens.weight"
    assert torch.equal(before[embed], after[embed])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 5


def test_warmup_needs_a_step_budget():
    with pytest.raises(ValueError, match="steps"):
        span_reconstruction_warmup(build_model(SMALL_T5), embedded_tokenizer(causal=False), ["a b"],
                                   is_encoder_decoder=True, steps=0)


def test_warmup_runs_on_the_threads_asked_then_restores_them_and_logs_progress(caplog):
    model = build_model(SMALL_T5)
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="sapt.backbones.warmup"):
            span_reconstruction_warmup(model, embedded_tokenizer(causal=False), ["alpha beta gamma"],
                                       is_encoder_decoder=True, steps=3, batch_size=2, num_threads=1,
                                       progress_every_s=0)
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    progress = [r.getMessage() for r in caplog.records if "warm-up step" in r.getMessage()]
    assert [m.split()[2] for m in progress] == ["1/3", "2/3", "3/3"]
    assert "done in" in progress[-1]


def test_causal_warmup_loss_equals_the_full_model_loss():
    tok = embedded_tokenizer(causal=True)
    model = build_model(SMALL_LLAMA)
    pairs = [("alpha [ beta gamma ] delta", "beta gamma"), ("[ one ]", "one"), ("x y [ z ]", "z")]
    batch = _batch(tok, pairs, is_encoder_decoder=False)
    with torch.no_grad():
        assert torch.allclose(_causal_span_loss(model, batch), model(**batch).loss, atol=1e-5)


# ---- hub loader ----

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("hub")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_heads=4, pad_token_id=0, eos_token_id=102,
                                             decoder_start_token_id=0))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    for name, model, causal in (("t5", t5, False), ("llama", llama, True)):
        model.save_pretrained(root / name)
        tok = embedded_tokenizer(causal=causal)
        tok.padding_side = "right"  # the loader must set left padding itself for causal LMs
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize(
    "name,seq2seq,targets", [("t5", True, ["q", "v"]), ("llama", False, ["q_proj", "v_proj"])]
)
def test_hub_loader_reads_a_saved_folder(saved_models, name, seq2seq, targets):
    backbone = load_backbone(str(saved_models / name))
    assert backbone.is_encoder_decoder is seq2seq
    assert backbone.lora_targets == targets
    assert backbone.model.config.model_type == name
    assert not backbone.model.training and all(not p.requires_grad for p in backbone.model.parameters())
    assert backbone.tokenizer.padding_side == ("right" if seq2seq else "left")
    assert backbone.tokenizer.pad_token is not None
    assert backbone.identity.startswith(str(saved_models / name) + "@")
    assert backbone.identity == load_backbone(str(saved_models / name)).identity
    peft_model = get_peft_model(backbone.model, LoraConfig(r=2, target_modules=backbone.lora_targets))
    assert any(isinstance(m, LoraLayer) for m in peft_model.modules())


def test_hub_loader_missing_folder(tmp_path):
    with pytest.raises(SaptError) as info:
        load_backbone(str(tmp_path / "no-such-model"))
    assert info.value.source == "backbone"
    assert "does not exist" in str(info.value)


def test_hub_name_not_in_offline_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaptError) as info:
        load_backbone("sapt-test-org/no-such-model", cache_dir=tmp_path)
    assert info.value.source == "backbone"
    assert "sapt-test-org/no-such-model" in str(info.value)


def test_unknown_architecture_has_no_lora_targets():
    assert lora_targets_for("t5") == ["q", "v"]
    assert lora_targets_for("gpt2") == ["c_attn"]
    with pytest.raises(SaptError) as info:
        lora_targets_for("my-own-transformer")
    assert info.value.source == "backbone"


# ---- learnability (slow: warms the real tiny-t5 up once, then reads the cache) ----

def exact_match(backbone, examples) -> float:
    tok = backbone.tokenizer
    batch = tok([ex.source for ex in examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = backbone.model.generate(**batch, max_new_tokens=4, do_sample=False)
    preds = tok.batch_decode(out, skip_special_tokens=True)
    return sum(p.strip() == ex.target for p, ex in zip(preds, examples)) / len(examples)


def _training_batch(tok, examples) -> dict:
    batch = tok([ex.source for ex in examples], padding=True, return_tensors="pt")
    labels = tok(text_target=[ex.target for ex in examples], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return {**batch, "labels": labels}


def answer_loss(model, tok, examples) -> float:
    """Mean cross-entropy of the reference answers: forgetting as a number that moves smoothly
    (exact match after a second task sits anywhere from 0.1 to 0.97 with the LoRA's initial weights)."""
    with torch.no_grad():
        return float(model(**_training_batch(tok, examples)).loss)


def _train_lora(model, tok, task, steps: int, seed: int) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picked = [task.train[i] for i in torch.randint(len(task.train), (16,), generator=gen).tolist()]
        model(**_training_batch(tok, picked)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.slow
def test_lora_alone_learns_an_embedded_task_then_sequential_lora_forgets_it():
    """What SeqLoRA does on the embedded pair: learns each task, and the second overwrites the first."""
    torch.manual_seed(0)  # the LoRA's initial weights: not whatever earlier tests left in the global generator
    backbone = load_backbone("embedded:tiny-t5")  # default cache: the first run warms up (~2 min)
    first, second = (build_task(name, num_train=1000, num_val=0, num_test=100, seed=1)
                     for name in ("first-word", "last-word"))
    tok = backbone.tokenizer
    model = get_peft_model(backbone.model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                      target_modules=backbone.lora_targets))
    untrained = exact_match(backbone, first.test)
    _train_lora(model, tok, first, steps=250, seed=0)
    learned, learned_loss = exact_match(backbone, first.test), answer_loss(model, tok, first.test)
    assert untrained < 0.1
    assert learned > 0.8, (untrained, learned)
    _train_lora(model, tok, second, steps=250, seed=1)  # the same LoRA goes on to the next task
    assert exact_match(backbone, second.test) > 0.5
    after = answer_loss(model, tok, first.test)
    assert after > 3 * learned_loss, (learned_loss, after)  # overwritten: the first task's answers got unlikely
