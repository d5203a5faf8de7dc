"""Where sapt calls a dependency instead of hand-written code, the results stay bit-identical.

Each section keeps a copy of the code that was replaced (the reference) and compares against it:
tokenizer padding in the collator and the warm-up batches, PEFT's LoRA target table, and the
bytes of a saved LoRA block.
"""

import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from safetensors.torch import save_file

from sapt.backbones import load_backbone
from sapt.backbones.hub import LORA_TARGETS, lora_targets_for
from sapt.backbones.tiny import tokenizer_dir
from sapt.backbones.warmup import _batch, _marked_span
from sapt.data.collate import IGNORE_INDEX, Collator
from sapt.data.templates import ANSWER_CUE
from sapt.errors import SaptError
from sapt.pet import pool_files
from sapt.pet.lora_pool import PooledLoraLinear, Routing, targets_in

# ---- tokenizers: both embedded backbones, and a BERT tokenizer as minilm-t5 sets it up ----


def _bert_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


@pytest.fixture(scope="module", params=["embedded:tiny-t5", "embedded:tiny-llama", "bert"])
def tokenizer(request):
    return _bert_tokenizer() if request.param == "bert" else load_backbone(request.param).tokenizer


def _assert_same_tensors(new: dict, old: dict) -> None:
    assert sorted(new) == sorted(old)
    for key, want in old.items():
        assert new[key].dtype == want.dtype == torch.long, key
        assert torch.equal(new[key], want), key


# ---- collate.py: reference = the hand-written padding the collator had before ----


class _ReferenceCollator:
    def __init__(self, tokenizer, is_encoder_decoder, max_source_len, max_target_len):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def _encode(self, texts, limit, special):
        return self.tokenizer(list(texts), add_special_tokens=special, truncation=True, max_length=limit)["input_ids"]

    def _answers(self, targets):
        return [row + [self.eos_id] for row in self._encode(targets, self.max_target_len - 1, special=False)]

    def train_batch(self, sources, targets):
        answers = self._answers(targets)
        if self.is_encoder_decoder:
            prompts = self._encode(sources, self.max_source_len, special=True)
            batch = self._pad(prompts, left=False)
            batch["labels"] = self._pad_rows(answers, IGNORE_INDEX, left=False)
            return batch
        prompts = self._decoder_prompts(sources)
        rows = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
        batch = self._pad(rows, left=True)
        batch["labels"] = self._pad_rows(labels, IGNORE_INDEX, left=True)
        return batch

    def _decoder_prompts(self, sources):
        # Over the limit: the head of the prompt before the answer cue, then the whole cue.
        cue = self.tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        rows = []
        for source in sources:
            whole = self.tokenizer(source, add_special_tokens=False)["input_ids"]
            if len(whole) <= self.max_source_len:
                rows.append(whole)
            elif source.endswith(ANSWER_CUE) and len(cue) < self.max_source_len:
                body = self.tokenizer(source[: -len(ANSWER_CUE)], add_special_tokens=False)["input_ids"]
                rows.append(body[: self.max_source_len - len(cue)] + cue)
            else:
                rows.append(whole[: self.max_source_len])
        return rows

    def generation_batch(self, sources):
        if self.is_encoder_decoder:
            return self._pad(self._encode(sources, self.max_source_len, special=True), left=False)
        return self._pad(self._decoder_prompts(sources), left=True)

    def _pad(self, rows, left):
        ids = self._pad_rows(rows, self.pad_id, left)
        mask = self._pad_rows([[1] * len(r) for r in rows], 0, left)
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def _pad_rows(rows, value, left):
        width = max(len(r) for r in rows)
        padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)


_LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen " * 8
_BATCHES = [
    # uneven lengths; the long source is cut at max_source_len, the long answer at max_target_len
    (["short", "a longer prompt with several more words\nOutput: ", _LONG, "mid length prompt here",
      "Definition line.\n" + _LONG + ANSWER_CUE],
     ["red", "", "a rather long answer that does not fit in the target budget at all", "blue green", "cue"]),
    (["only one prompt"], ["only one answer"]),  # batch of one: no padding at all
    ([_LONG, _LONG + "extra"], ["x", "y z"]),  # every source truncated: equal widths
    (["", "some words"], ["a", "b"]),  # an empty prompt
]


@pytest.mark.parametrize("is_encoder_decoder", [True, False], ids=["seq2seq", "decoder-only"])
@pytest.mark.parametrize("max_source_len", [8, 64])
def test_collator_batches_equal_the_hand_padded_ones(tokenizer, is_encoder_decoder, max_source_len):
    args = (tokenizer, is_encoder_decoder, max_source_len, 6)
    new, old = Collator(*args), _ReferenceCollator(*args)
    for sources, targets in _BATCHES:
        _assert_same_tensors(new.train_batch(sources, targets), old.train_batch(sources, targets))
        _assert_same_tensors(new.generation_batch(sources), old.generation_batch(sources))
    assert new.generation_batch([_LONG])["input_ids"].shape[1] == max_source_len


# ---- warmup.py: reference = the hand-written _pad of the warm-up batches ----


def _reference_pad(rows, value, *, left):
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def _reference_batch(tokenizer, pairs, is_encoder_decoder):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sources = [tokenizer(src)["input_ids"] for src, _ in pairs]
    targets = [tokenizer(tgt, add_special_tokens=False)["input_ids"] + [eos] for _, tgt in pairs]
    if is_encoder_decoder:
        input_ids, attention = _reference_pad(sources, pad, left=False)
        labels, _ = _reference_pad(targets, -100, left=False)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    rows = [src + tgt for src, tgt in zip(sources, targets)]
    label_rows = [[-100] * len(src) + tgt for src, tgt in zip(sources, targets)]
    input_ids, attention = _reference_pad(rows, pad, left=True)
    labels, _ = _reference_pad(label_rows, -100, left=True)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("is_encoder_decoder", [True, False], ids=["seq2seq", "decoder-only"])
def test_warmup_batches_equal_the_hand_padded_ones(tokenizer, is_encoder_decoder):
    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    for size in (1, 2, 7, 32):
        texts = [[rng.choice(vocab) for _ in range(rng.randint(1, 30))] for _ in range(size)]
        pairs = [_marked_span(words, rng, 0.3, ("[", "]")) for words in texts]
        _assert_same_tensors(_batch(tokenizer, pairs, is_encoder_decoder),
                             _reference_batch(tokenizer, pairs, is_encoder_decoder))


# ---- hub.py: lora_targets_for as it answered before PEFT's table became the source ----

_TARGETS_BEFORE = {
    "RefinedWeb": ["query_key_value"], "RefinedWebModel": ["query_key_value"], "bart": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "blenderbot": ["q_proj", "v_proj"], "blip-2": ["q", "v", "q_proj", "v_proj"],
    "bloom": ["query_key_value"], "btlm": ["c_proj", "c_attn"], "chatglm": ["query_key_value"],
    "codegen": ["qkv_proj"], "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "electra": ["query", "value"], "falcon": ["query_key_value"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"], "gpt_neo": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"], "granite": ["q_proj", "v_proj"], "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "longt5": ["q", "v"],
    "m2m_100": ["q_proj", "v_proj"], "marian": ["q_proj", "v_proj"], "mbart": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"], "mpt": ["Wqkv"], "mt5": ["q", "v"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "nllb_moe": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"], "olmo2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "pegasus": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "phi3": ["qkv_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen2_moe": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"], "roberta": ["query", "value"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "smollm3": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "switch_transformers": ["q", "v"],
    "t5": ["q", "v"], "umt5": ["q", "v"], "xlm-roberta": ["query", "value"],
}


@pytest.mark.parametrize("model_type", sorted(_TARGETS_BEFORE))
def test_lora_targets_are_the_ones_given_before(model_type):
    assert lora_targets_for(model_type) == _TARGETS_BEFORE[model_type]


def test_the_local_target_table_only_holds_what_peft_lacks():
    redundant = [t for t, targets in LORA_TARGETS.items() if PEFT_TARGETS.get(t) == targets]
    assert not redundant, f"PEFT already gives these targets; drop them from hub.LORA_TARGETS: {redundant}"


def test_unknown_or_regex_only_model_types_raise():
    regex_only = [t for t, targets in PEFT_TARGETS.items() if isinstance(targets, str) and t not in LORA_TARGETS]
    for model_type in ["my-own-transformer", *regex_only]:
        with pytest.raises(SaptError) as info:
            lora_targets_for(model_type)
        assert info.value.source == "backbone"
        assert "t5" in str(info.value) and "bert" in str(info.value)  # the message lists what is supported


# ---- pool_files.py: reference = save_lora_block before it left the config to PEFT ----


def _reference_save_lora_block(layers, index, out_dir, *, targets, alpha, is_encoder_decoder, base_model):
    rank = next(iter(layers.values())).rank
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.block(index)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, base_model_name_or_path=base_model,
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    config_file = out_dir / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", ["embedded:tiny-t5", "embedded:tiny-llama"])
def test_a_saved_lora_block_has_the_same_bytes_and_loads_in_peft(name, tmp_path):
    backbone = load_backbone(name)
    torch.manual_seed(0)
    routing = Routing()
    layers = {}
    for module_name in targets_in(backbone.model, backbone.lora_targets):  # the model itself stays bare
        layer = PooledLoraLinear(backbone.model.get_submodule(module_name), routing, rank=4, alpha=8.0,
                                 dropout=0.0, old_blocks=1)
        rank_rows, d_in = layer.old_A.shape
        layer.load_old_blocks([(torch.randn(rank_rows, d_in), torch.randn(layer.old_B.shape))])
        with torch.no_grad():
            layer.lora_B.normal_()
        layers[module_name] = layer
    kwargs = {"alpha": 8.0, "is_encoder_decoder": backbone.is_encoder_decoder, "base_model": backbone.identity}
    for index in (0, 1):
        new, old = tmp_path / f"new-{index}", tmp_path / f"old-{index}"
        pool_files.save_lora_block(layers, index, new, targets=list(reversed(backbone.lora_targets)), **kwargs)
        _reference_save_lora_block(layers, index, old, targets=backbone.lora_targets, **kwargs)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (new / file).read_bytes() == (old / file).read_bytes(), file
        peft_model = PeftModel.from_pretrained(backbone.model, str(new))
        for module_name, layer in layers.items():
            module = peft_model.base_model.model.get_submodule(module_name)
            a, b = layer.block(index)
            assert torch.equal(module.lora_A["default"].weight, a) and torch.equal(module.lora_B["default"].weight, b)
        backbone.model = peft_model.unload()
