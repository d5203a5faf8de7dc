"""A user's own tasks, kept next to the CL_Benchmark folders: ``data_dir/NAME/`` holding a train and a
test split as JSON Lines (``train.jsonl``, ``test.jsonl``), Parquet (``train.parquet``, ``test.parquet``)
or one Hugging Face ``save_to_disk`` DatasetDict with ``train`` and ``test`` splits; every row has an
``input`` string and an ``output`` (a string, or a list of acceptable strings). An optional
``task.json`` gives the task's ``definition`` (the instruction line of its prompts), its ``labels``
(a label set; EPI needs one) and its ``kind`` (``classification``: exact match; ``generation``:
Rouge-L; default classification when labels are given, else generation).

Read with ``datasets``; from there a task takes the same path as a benchmark task (validation carved
from train, seeded caps, the Long Sequence template, Ray Data on the workers).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sapt.data.cl_benchmark import assemble_task
from sapt.data.templates import long_sequence_prompt
from sapt.data.types import TaskData
from sapt.errors import SaptError
from sapt.jsonfile import read_json_object

SPLITS = ("train", "test")
FILE_FORMATS = (".jsonl", ".parquet")
DATASET_DICT = "dataset_dict.json"  # what save_to_disk writes for a DatasetDict
TASK_FILE = "task.json"
_TASK_KEYS = {"definition", "labels", "kind"}


def is_own_task(folder: Path) -> bool:
    """Whether ``folder`` holds a task in one of the formats above."""
    return (folder / DATASET_DICT).is_file() or any((folder / f"train{ext}").is_file() for ext in FILE_FORMATS)


def load_own_task(folder: Path, *, max_train: int | None, max_eval: int | None, val_size: int,
                  seed: int) -> TaskData:
    """Loads the task in ``folder`` (named after the folder).

    Raises:
        SaptError: a missing split, an unreadable file, a missing or mistyped column or value, or a bad
            ``task.json``; the message names the file and the field (``input``, ``[row 3].output``).
    """
    meta = _task_meta(folder)
    splits = _read_splits(folder)
    raw = {split: _pairs(rows, source) for split, (rows, source) in splits.items()}
    labels = meta.get("labels")
    kind = meta.get("kind") or ("classification" if labels else "generation")
    return assemble_task(
        folder.name, kind, meta.get("definition", ""), long_sequence_prompt, raw["train"], raw["test"],
        labels=tuple(labels) if labels else None, train_source=splits["train"][1], train_field="rows",
        max_train=max_train, max_eval=max_eval, val_size=val_size, seed=seed,
    )


def _task_meta(folder: Path) -> dict[str, Any]:
    path = folder / TASK_FILE
    if not path.is_file():
        return {}
    meta = read_json_object(path, missing="file missing")
    for key in meta:
        if key not in _TASK_KEYS:
            raise SaptError(f"unknown key; known: {', '.join(sorted(_TASK_KEYS))}", source=str(path), field=key)
    if "definition" in meta and not isinstance(meta["definition"], str):
        raise SaptError("must be a string", source=str(path), field="definition")
    labels = meta.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels
                               or not all(isinstance(v, str) for v in labels) or len(set(labels)) != len(labels)):
        raise SaptError("must be a non-empty list of distinct strings", source=str(path), field="labels")
    if meta.get("kind") not in (None, "classification", "generation"):
        raise SaptError(f"must be classification or generation, got {meta['kind']!r}", source=str(path),
                        field="kind")
    return meta


def _read_splits(folder: Path) -> dict[str, tuple[list[dict], str]]:
    """Each split's rows and the file (or folder) they came from."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # datasets' per-file bars would break into our console's progress lines
    try:
        return _read_splits_quietly(folder)
    finally:
        if not quiet:
            enable_progress_bars()


def _read_splits_quietly(folder: Path) -> dict[str, tuple[list[dict], str]]:
    import datasets

    if (folder / DATASET_DICT).is_file():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:  # a folder save_to_disk did not write, or a damaged one
            raise SaptError(f"cannot read the saved dataset: {_first_line(exc)}", source=str(folder)) from exc
        for split in SPLITS:
            if split not in loaded:
                raise SaptError(f"no {split!r} split (it has: {', '.join(loaded)})", source=str(folder))
        return {split: (loaded[split].to_list(), f"{folder}[{split}]") for split in SPLITS}

    found: dict[str, tuple[list[dict], str]] = {}
    cache = tempfile.mkdtemp(prefix="sapt-own-task-")  # datasets' Arrow files, gone after reading
    try:
        for split in SPLITS:
            files = [folder / f"{split}{ext}" for ext in FILE_FORMATS if (folder / f"{split}{ext}").is_file()]
            if not files:
                raise SaptError(f"split file missing: expected {split}.jsonl or {split}.parquet", source=str(folder))
            path = files[0]
            reader = datasets.Dataset.from_json if path.suffix == ".jsonl" else datasets.Dataset.from_parquet
            try:
                table = reader(str(path), cache_dir=cache, keep_in_memory=True)
            except Exception as exc:  # malformed JSON Lines or Parquet: pyarrow's and datasets' own errors
                raise SaptError(f"cannot read: {_first_line(exc)}", source=str(path)) from exc
            found[split] = (table.to_list(), str(path))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return found


def _pairs(rows: list[dict], source: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(input, references)`` per row, every value checked."""
    if not rows:
        raise SaptError("no rows", source=source)
    for column in ("input", "output"):
        if column not in rows[0]:
            raise SaptError(f"missing column (columns: {', '.join(rows[0])})", source=source, field=column)
    pairs = []
    for n, row in enumerate(rows):
        text, output = row["input"], row["output"]
        if not isinstance(text, str):
            raise SaptError(f"must be a string, got {type(text).__name__}", source=source, field=f"[row {n}].input")
        if isinstance(output, str):
            output = [output]
        if not isinstance(output, list) or not output or not all(isinstance(o, str) for o in output):
            raise SaptError("must be a string or a non-empty list of strings", source=source,
                            field=f"[row {n}].output")
        pairs.append((text, tuple(output)))
    return pairs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
