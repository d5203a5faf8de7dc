"""Batch inference of a registered pool over a JSONL file with Ray Data: one pool per actor, rows in
order, written to one JSONL file. No task ids: the pool's router picks the blocks for each input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import ray

from sapt.errors import SaptError

INPUT_FIELD = "input"


def check_input_file(path: Path) -> int:
    """Counts the rows of a JSONL prompts file, checking each is an object with a string ``input``.

    Raises:
        SaptError: a missing file, bad JSON or a missing/non-string ``input``, naming file and line.
    """
    if not path.is_file():
        raise SaptError("input file not found", source=str(path))
    count = 0
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise SaptError(f"line {number}: not JSON ({err})", source=str(path)) from None
            if not isinstance(row, dict) or not isinstance(row.get(INPUT_FIELD), str):
                raise SaptError(f"line {number}: expected an object with a string field 'input'", source=str(path),
                                field=INPUT_FIELD)
            count += 1
    if count == 0:
        raise SaptError("no rows", source=str(path))
    return count


class PoolPredictor:
    """A Ray Data actor holding one loaded pool version."""

    def __init__(self, tracking_uri: str, name: str, version: str, model_config: dict):
        from sapt.registry import pool_store

        self.model = pool_store.load_pool(tracking_uri, name, version, model_config=model_config)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = self.model.predict(batch[[INPUT_FIELD]])
        return batch.assign(**{column: out[column].tolist() for column in out.columns})


def in_input_order(dataset):
    """``dataset``, set to give its rows (and those of datasets derived from it) in input order.

    A Dataset keeps the DataContext current when it was created: setting ``preserve_order`` on the
    global context afterwards leaves it out of order (actors finish batches in any order).
    """
    dataset.context.execution_options.preserve_order = True
    return dataset


def answered(dataset, tracking_uri: str, name: str, version: str, *, actors: int = 1, batch_size: int = 32,
             model_config: dict | None = None):
    """``dataset`` (a column ``input``, others kept) with the pool's ``answer`` and ``block_weights``
    added, rows in their input order."""
    from sapt.cluster.worker import quiet_ray_data

    quiet_ray_data()
    return in_input_order(dataset).map_batches(
        PoolPredictor,
        fn_constructor_kwargs={"tracking_uri": tracking_uri, "name": name, "version": version,
                               "model_config": dict(model_config or {})},
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )


def predict_file(tracking_uri: str, name: str, version: str, input_path: Path, output_path: Path, *,
                 actors: int = 1, batch_size: int = 32, model_config: dict | None = None) -> int:
    """Answers every row of ``input_path`` (other fields are passed through); returns the row count."""
    rows = check_input_file(input_path)
    answers = answered(ray.data.read_json(str(input_path.resolve()), lines=True), tracking_uri, name, version,
                       actors=actors, batch_size=batch_size, model_config=model_config)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    written = 0
    with partial.open("w") as handle:
        for row in _rows(answers):
            handle.write(json.dumps(row) + "\n")
            written += 1
    if written != rows:
        raise RuntimeError(f"{written} answers for {rows} inputs")
    partial.replace(output_path)  # never a half-written output under the final name
    return written


def _rows(dataset) -> Iterator[dict]:
    for batch in dataset.iter_batches(batch_format="pandas", batch_size=256):
        for record in batch.to_dict(orient="records"):
            yield {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in record.items()}
