"""Search-space files: a YAML mapping from config keys to distributions, read and checked (no Ray).

    method_args.kl_weight:      {loguniform: [0.1, 10.0]}   # floats, log scale, bounds inclusive
    method_args.temperature:    {uniform: [2.0, 32.0]}      # floats, linear scale
    method_args.projection_dim: {lograndint: [16, 256]}     # integers, log scale, bounds inclusive
    pet.lora_r:                 {choice: [4, 8, 16]}        # one of the listed values (null allowed)

Whether the values are valid for the config being swept is checked in ``configs.check_space``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sapt.errors import SaptError

FLOAT_KINDS = ("uniform", "loguniform")
INT_KINDS = ("randint", "lograndint")
KINDS = (*FLOAT_KINDS, *INT_KINDS, "choice")
# Set by the sweep itself for every trial: sampling them would break the trial's bookkeeping.
RESERVED = ("order", "output_dir", "eval.split", "mlflow.", "ray.", "single_results")


@dataclass(frozen=True)
class Dimension:
    """One swept config key.

    Args:
        key: the dotted config key, as ``--set`` takes it (``method_args.kl_weight``).
        kind: one of ``KINDS``.
        values: ``(low, high)`` for the ranges (both inclusive), the candidates for ``choice``.
    """

    key: str
    kind: str
    values: tuple

    def extremes(self) -> list:
        """The values that bound the dimension: both ends of a range, every candidate of a choice."""
        return list(self.values)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        low, high = self.values
        if self.kind in INT_KINDS and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        return isinstance(value, (int, float)) and low <= value <= high

    def to_json(self) -> dict:
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of one space file, in file order."""

    source: str
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def to_json(self) -> dict:
        return {d.key: d.to_json() for d in self.dimensions}


def load_space(path: str | Path) -> SearchSpace:
    """Reads and checks a space file.

    Raises:
        SaptError: missing file, bad YAML, an unknown distribution, bad bounds, a reserved key;
            ``source`` is the file, ``field`` the key at fault.
    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise SaptError("search-space file not found", source=source)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SaptError(f"invalid YAML: {err}", source=source) from None
    if not isinstance(raw, dict) or not raw:
        raise SaptError("expected a mapping of config keys to distributions, e.g. "
                        "'method_args.kl_weight: {loguniform: [0.1, 10]}'", source=source)
    return SearchSpace(source, tuple(_dimension(source, key, spec) for key, spec in raw.items()))


def _dimension(source: str, key: Any, spec: Any) -> Dimension:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise SaptError("keys must be dotted config keys such as method_args.kl_weight", source=source,
                        field=str(key))
    if key.startswith(RESERVED) or key in ("eval", "mlflow", "ray"):
        raise SaptError("is set by the sweep for every trial and cannot be swept", source=source, field=key)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SaptError(f"expected one distribution, {{KIND: [...]}} with KIND one of {', '.join(KINDS)}",
                        source=source, field=key)
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise SaptError(f"unknown distribution {kind!r}; known: {', '.join(KINDS)}", source=source, field=key)
    if not isinstance(values, list) or not values:
        raise SaptError(f"{kind}: expected a non-empty list", source=source, field=key)
    if kind == "choice":
        return Dimension(key, kind, tuple(_choices(source, key, values)))
    return Dimension(key, kind, _bounds(source, key, kind, values))


def _choices(source: str, key: str, values: list) -> list:
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise SaptError(f"choice: candidates must be numbers, strings, booleans or null, got {value!r}",
                            source=source, field=key)
    if len(set(map(repr, values))) != len(values):
        raise SaptError("choice: a candidate appears twice", source=source, field=key)
    return values


def _bounds(source: str, key: str, kind: str, values: list) -> tuple:
    if len(values) != 2:
        raise SaptError(f"{kind}: expected [low, high], got {values!r}", source=source, field=key)
    low, high = values
    wanted = int if kind in INT_KINDS else (int, float)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, wanted) or not math.isfinite(value):
            what = "integers" if kind in INT_KINDS else "numbers"
            raise SaptError(f"{kind}: bounds must be {what}, got {value!r}", source=source, field=key)
    if not low < high:
        raise SaptError(f"{kind}: low must be below high, got [{low}, {high}]", source=source, field=key)
    if kind.startswith("log") and low <= 0:
        raise SaptError(f"{kind}: bounds must be positive, got low {low}", source=source, field=key)
    if kind in FLOAT_KINDS:
        return float(low), float(high)
    return low, high
