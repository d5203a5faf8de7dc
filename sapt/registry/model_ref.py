"""Parsing what users type to name a registered version: ``models:/P/3``, ``models:/P@champion``, ``P@newest``, ``P/3``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sapt.errors import SaptError

_REF = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))?$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model, and optionally one version of it by number or alias."""

    name: str
    version_or_alias: str | None

    @property
    def uri(self) -> str:
        if self.version_or_alias is None:
            return f"models:/{self.name}"
        sep = "/" if self.version_or_alias.isdigit() else "@"
        return f"models:/{self.name}{sep}{self.version_or_alias}"


def parse_model_ref(text: str, *, field: str = "model", need_version: bool = False) -> ModelRef:
    """``[models:/]NAME[/VERSION | @ALIAS]``.

    Raises:
        SaptError: (naming ``field``) anything else, or no version or alias when ``need_version``.
    """
    match = _REF.match(text.strip())
    if not match:
        raise SaptError(f"{text!r} is not a registered model: expected models:/NAME/VERSION or models:/NAME@ALIAS",
                        source=field)
    ref = match.group("version") or match.group("alias")
    if need_version and ref is None:
        raise SaptError(f"{text!r} names no version: add /VERSION or @ALIAS (e.g. @newest)", source=field)
    return ModelRef(match.group("name"), ref)
