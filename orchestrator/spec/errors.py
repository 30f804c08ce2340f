"""SpecError: the one error type of a bad sweep spec, raised while reading, overriding or
validating it. Apart from the reading and the schema so that both can raise it."""

from __future__ import annotations

from typing import Any


class SpecError(Exception):
    """A sweep spec the user must fix. str(e) is one line: "<file>: <key path>: <problem> (got <value>)"."""

    _NO_VALUE = object()

    def __init__(self, key: str, problem: str, got: Any = _NO_VALUE, file: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.got = got
        self.file = file
        super().__init__(str(self))

    def with_file(self, file: str) -> "SpecError":
        return SpecError(self.key, self.problem, self.got, file)

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        text = ": ".join([*parts, self.problem])
        if self.got is not SpecError._NO_VALUE:
            text += f" (got {short_repr(self.got)})"
        return " ".join(text.split())  # one line, whatever the messages inside contained


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
