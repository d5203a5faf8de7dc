"""The one error type users see: it names the file or config key at fault."""

from __future__ import annotations


class SaptError(Exception):
    """Bad input from the user: a config value, a data file, a task name.

    The CLI prints ``str(error)`` and exits with status 2, without a traceback.

    Args:
        message: what is wrong, in one sentence.
        source: the file path or config key at fault (``order``, ``/data/sst2/train.json``).
        field: optional field inside ``source`` (``Instances[3].output``).
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.source or ""
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        return f"{where}: {self.message}" if where else self.message
