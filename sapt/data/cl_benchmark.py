"""Reader for the public CL_Benchmark folder format (SuperNI tasks and Long Sequence datasets).

Layout and schema: sapt-method.md 4.1-4.2. Only ``Definition[0]``, ``input`` and ``output`` are read.
"""

from __future__ import annotations

import difflib
import logging
import random
from pathlib import Path
from typing import Any

from sapt.data.templates import long_sequence_prompt, superni_prompt
from sapt.data.types import Example, TaskData, TaskKind
from sapt.errors import SaptError
from sapt.jsonfile import read_json, read_json_object

logger = logging.getLogger(__name__)

BENCHMARKS = ("SuperNI", "Long_Sequence")

# One raw instance after validation: (input, every reference string).
_Raw = tuple[str, tuple[str, ...]]


def list_tasks(data_dir: str | Path) -> dict[str, str]:
    """Every task folder present under ``data_dir``.

    Args:
        data_dir: the CL_Benchmark folder.

    Returns:
        Task folder name -> benchmark (``"SuperNI"`` or ``"Long_Sequence"``); empty if none.
    """
    root = Path(data_dir)
    found: dict[str, str] = {}
    for bench in BENCHMARKS:
        bench_dir = root / bench
        if bench_dir.is_dir():
            for child in sorted(bench_dir.iterdir()):
                if child.is_dir():
                    found.setdefault(child.name, bench)
    return found


def find_task_dir(data_dir: str | Path, name: str) -> tuple[str, Path]:
    """Locate a task folder under either benchmark.

    Args:
        data_dir: the CL_Benchmark folder.
        name: the task folder name (``task363_sst2_polarity_classification``, ``sst2``).

    Returns:
        ``(benchmark, folder)`` with benchmark ``"SuperNI"`` or ``"Long_Sequence"``.

    Raises:
        SaptError: ``data_dir`` is missing, or no benchmark has a folder called ``name``
            (the message suggests close names).
    """
    root = _check_data_dir(data_dir)
    if name and "/" not in name and "\\" not in name and name not in (".", ".."):
        for bench in BENCHMARKS:
            folder = root / bench / name
            if folder.is_dir():
                return bench, folder
    known = list_tasks(root)
    # Substring hits first (users type "task363" or "sst2"), then edit-distance neighbours.
    close = [k for k in known if name and name.lower() in k.lower()][:3]
    close += [k for k in difflib.get_close_matches(name, known, n=3, cutoff=0.5) if k not in close]
    hint = f"; close names: {', '.join(close[:3])}" if close else ""
    raise SaptError(
        f"task {name!r} not found under {' or '.join(BENCHMARKS)}{hint}",
        source=str(root),
    )


def load_task(
    data_dir: str | Path,
    name: str,
    *,
    max_train: int | None,
    max_eval: int | None,
    val_size: int,
    seed: int,
) -> TaskData:
    """Load one task, with a validation split carved from train.json.

    dev.json is byte-identical to test.json in CL_Benchmark (sapt-method.md 6.1), so it is never read;
    validation comes from a seeded shuffle of train.json instead. Caps draw seeded samples, never the
    head of a file, so a file sorted by label cannot give a one-class subset.

    Args:
        data_dir: the CL_Benchmark folder.
        name: the task folder name.
        max_train: keep at most this many train instances after carving (None: all).
        max_eval: keep at most this many test instances (None: all).
        val_size: how many train.json instances go to the validation split.
        seed: seeds the carving, the caps and the choice of training reference.

    Returns:
        The task, with templates applied. ``kind`` is "classification" for Long Sequence and for
        SuperNI tasks whose outputs are plain strings, "generation" otherwise.

    Raises:
        SaptError: a missing folder or file, malformed JSON, or a malformed field; the message
            names the file and the field.
    """
    _check_caps(max_train=max_train, max_eval=max_eval, val_size=val_size)
    bench, folder = find_task_dir(data_dir, name)
    train_file, test_file = folder / "train.json", folder / "test.json"
    train_doc, test_doc = _read_json(train_file), _read_json(test_file)

    instruction = _definition(train_doc, train_file)
    train_raw, train_all_str = _instances(train_doc, train_file)
    test_raw, test_all_str = _instances(test_doc, test_file)

    kind: TaskKind
    if bench == "Long_Sequence" or (train_all_str and test_all_str):
        kind = "classification"
    else:
        kind = "generation"
    template = superni_prompt if bench == "SuperNI" else long_sequence_prompt
    return assemble_task(
        name, kind, instruction, template, train_raw, test_raw,
        labels=_labels(folder / "labels.json") if bench == "Long_Sequence" else None,
        train_source=str(train_file), max_train=max_train, max_eval=max_eval, val_size=val_size, seed=seed,
    )


def assemble_task(
    name: str,
    kind: TaskKind,
    instruction: str,
    template,
    train_raw: list[_Raw],
    test_raw: list[_Raw],
    *,
    labels: tuple[str, ...] | None,
    train_source: str,
    train_field: str = "Instances",
    max_train: int | None,
    max_eval: int | None,
    val_size: int,
    seed: int,
) -> TaskData:
    """A task from validated ``(input, references)`` pairs: the validation split carved from train
    by a seeded shuffle, seeded caps, one training reference per instance, the template applied.
    ``train_source`` and ``train_field`` name the training data in errors."""
    # Separate streams per purpose (string seeds hash deterministically), so changing one cap never
    # changes what another draw picks.
    split_rng = random.Random(f"{seed}:{name}:split")
    order = list(range(len(train_raw)))
    split_rng.shuffle(order)
    val_idx, train_idx = order[:val_size], order[val_size:]
    if not train_idx:
        raise SaptError(
            f"val_size={val_size} leaves no training instances ({len(train_raw)} in the file)",
            source=train_source,
            field=train_field,
        )
    if max_train is not None:
        train_idx = train_idx[:max_train]  # head of a seeded shuffle = seeded sample

    test_idx = list(range(len(test_raw)))
    if max_eval is not None and max_eval < len(test_idx):
        test_idx = random.Random(f"{seed}:{name}:test").sample(test_idx, max_eval)

    def build(raw: list[_Raw], indices: list[int], stream: str) -> list[Example]:
        # One reference per instance is the training target (sapt-method.md 4.2); scoring still
        # sees all of them through ``references``. Drawn over the whole file in file order, so an
        # instance keeps its target whatever val_size and the caps select.
        rng = random.Random(f"{seed}:{name}:{stream}")
        targets = [refs[0] if len(refs) == 1 else refs[rng.randrange(len(refs))] for _, refs in raw]
        return [
            Example(source=template(instruction, raw[i][0]), target=targets[i], references=raw[i][1])
            for i in indices
        ]

    return TaskData(
        name=name,
        kind=kind,
        instruction=instruction,
        train=build(train_raw, train_idx, "train-target"),
        val=build(train_raw, val_idx, "train-target"),
        test=build(test_raw, test_idx, "test-target"),
        labels=labels,
    )


def _labels(path: Path) -> tuple[str, ...] | None:
    """A Long Sequence dataset's label set (labels.json: a list of distinct strings); None without the file.

    Raises:
        SaptError: the file is not such a list.
    """
    if not path.is_file():
        return None
    labels = read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels) \
            or len(set(labels)) != len(labels):
        raise SaptError("expected a non-empty list of distinct strings", source=str(path))
    return tuple(labels)


def _check_data_dir(data_dir: str | Path) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise SaptError("data directory not found", source=str(root))
    return root


def _check_caps(*, max_train: int | None, max_eval: int | None, val_size: int) -> None:
    checks = (("max_train", max_train, 1), ("max_eval", max_eval, 1), ("val_size", val_size, 0))
    for key, value, low in checks:
        if value is None and key != "val_size":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SaptError(f"must be an integer >= {low}, got {value!r}", source=key)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, missing="split file missing")


def _definition(doc: dict[str, Any], path: Path) -> str:
    definition = doc.get("Definition", [])
    if not isinstance(definition, list):
        raise SaptError("must be a list of strings", source=str(path), field="Definition")
    if not definition:
        return ""  # copa: no instruction at all
    if not isinstance(definition[0], str):
        raise SaptError("must be a string", source=str(path), field="Definition[0]")
    return definition[0]


def _instances(doc: dict[str, Any], path: Path) -> tuple[list[_Raw], bool]:
    """Validated ``(input, references)`` pairs and whether every output was a plain string."""
    items = doc.get("Instances")
    if items is None:
        raise SaptError("missing key", source=str(path), field="Instances")
    if not isinstance(items, list):
        raise SaptError(f"must be a list, got {type(items).__name__}", source=str(path), field="Instances")
    raw: list[_Raw] = []
    all_str = True
    skipped = 0
    for n, item in enumerate(items):
        where = f"Instances[{n}]"
        if not isinstance(item, dict):
            raise SaptError("must be an object", source=str(path), field=where)
        if "input" not in item:
            raise SaptError("missing key", source=str(path), field=f"{where}.input")
        if "output" not in item:
            raise SaptError("missing key", source=str(path), field=f"{where}.output")
        text, output = item["input"], item["output"]
        if not isinstance(text, str):
            raise SaptError(
                f"must be a string, got {type(text).__name__}", source=str(path), field=f"{where}.input"
            )
        if isinstance(output, str):
            raw.append((text, (output,)))
            continue
        all_str = False
        if not isinstance(output, list) or not all(isinstance(o, str) for o in output):
            raise SaptError(
                "must be a string or a list of strings", source=str(path), field=f"{where}.output"
            )
        if not output:
            # Nothing to train on or score against; none of the shipped files has one.
            skipped += 1
            continue
        raw.append((text, tuple(output)))
    if skipped:
        logger.warning("%s: skipped %d instances with an empty output list", path, skipped)
    if not raw:
        raise SaptError("no instances", source=str(path), field="Instances")
    return raw, all_str
