"""The table of continual-learning methods the runner can run (``method:`` in a config)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sapt.errors import SaptError
from sapt.methods.base import Method, NoArgs, Stage, TaskInfo
from sapt.methods.conpet import ConpetDynamic, ConpetStatic
from sapt.methods.epi import Epi
from sapt.methods.l2p import L2P
from sapt.methods.lfpt5 import Lfpt5
from sapt.methods.lora import MultiTaskLora, Replay, SeqLora, SingleLora
from sapt.methods.olora import OLora
from sapt.methods.prog_prompt import ProgPrompt
from sapt.methods.sapt import SaptLora, SaptPrompt

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SeqLora, Replay, OLora, ConpetStatic, ConpetDynamic, L2P, Lfpt5, ProgPrompt, Epi, SingleLora,
                              MultiTaskLora, SaptLora, SaptPrompt)
}


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise SaptError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}", source="method")
    return METHODS[name]


def validate_method_args(name: str, method_args: dict[str, Any]) -> dict[str, Any]:
    """``method_args`` checked against the method's own Config; returns every value, defaults included.

    Raises:
        SaptError: an unknown key or a bad value, with field ``method_args.KEY``.
    """
    try:
        args = _method_class(name).Config.model_validate(method_args)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        message = "unknown key for method " + name if first["type"] == "extra_forbidden" else first["msg"]
        raise SaptError(message, source="config", field=f"method_args.{key}") from None
    return args.model_dump(mode="json")


def build_method(name: str, method_args: dict, pet) -> Method:
    """Instantiates a method, validating ``method_args`` against its own Config."""
    cls = _method_class(name)
    validate_method_args(name, method_args)
    return cls(cls.Config.model_validate(method_args), pet)


__all__ = ["METHODS", "Method", "NoArgs", "Stage", "TaskInfo", "build_method", "validate_method_args"]
