"""Reading a user's JSON file, with errors that name the file (JSON only: nothing is unpickled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sapt.errors import SaptError


def read_json_object(path: str | Path, *, missing: str = "file not found") -> dict[str, Any]:
    """Parses a JSON file whose top level must be an object.

    Raises:
        SaptError: the file is missing (``missing`` is the message), not UTF-8, not valid JSON, or
            not an object; the error names the file, and the line and column of a syntax error.
    """
    doc = read_json(path, missing=missing)
    if not isinstance(doc, dict):
        raise SaptError(f"expected a JSON object at top level, got {type(doc).__name__}", source=str(path))
    return doc


def read_json(path: str | Path, *, missing: str = "file not found") -> Any:
    """Parses a JSON file, whatever its top level.

    Raises:
        SaptError: the file is missing, not UTF-8 or not valid JSON (as ``read_json_object``).
    """
    file = Path(path)
    if not file.is_file():
        raise SaptError(missing, source=str(file))
    try:
        doc = json.loads(file.read_bytes())
    except json.JSONDecodeError as err:
        raise SaptError(f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}", source=str(file)) from None
    except UnicodeDecodeError as err:
        raise SaptError(f"not UTF-8 text: {err}", source=str(file)) from None
    return doc
