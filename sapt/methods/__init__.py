"""The table of continual-learning methods the runner can run (``method:`` in a config)."""

from __future__ import annotations

from pydantic import ValidationError

from sapt.errors import SaptError
from sapt.methods.base import Method, NoArgs, Stage
from sapt.methods.lora import MultiTaskLora, SeqLora, SingleLora
from sapt.methods.sapt import SaptLora, SaptPrompt

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SeqLora, SingleLora, MultiTaskLora, SaptLora, SaptPrompt)}


def build_method(name: str, method_args: dict, pet) -> Method:
    """Instantiates a method, validating ``method_args`` against its own Config."""
    if name not in METHODS:
        raise SaptError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}", source="method")
    cls = METHODS[name]
    try:
        args = cls.Config.model_validate(method_args)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise SaptError(first["msg"], source="method_args", field=key) from None
    return cls(args, pet)


__all__ = ["METHODS", "Method", "NoArgs", "Stage", "build_method"]
