"""Typed errors: every failure a caller can act on has its own class and names what failed."""

from __future__ import annotations


class AutoscalerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AutoscalerError, ValueError):
    """A configuration value is invalid; `field` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class InsufficientData(AutoscalerError):
    """Too little (non-missing) history to fit or forecast; never answered with a zero forecast."""

    def __init__(self, needed: int, got: int, what: str = "history") -> None:
        self.needed = needed
        self.got = got
        super().__init__(f"insufficient {what}: need at least {needed} observed points, got {got}")


class TraceFormatError(AutoscalerError, ValueError):
    """A trace file cannot be read; names the file and, where known, line and column."""

    def __init__(
        self, path: str, message: str, line: int | None = None, column: str | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class PrometheusError(AutoscalerError):
    """Prometheus was unreachable or answered an error; names the URL and the query."""

    def __init__(self, url: str, query: str, message: str) -> None:
        self.url = url
        self.query = query
        super().__init__(f"Prometheus at {url} failed for query {query!r}: {message}")
