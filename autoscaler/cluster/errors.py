"""Typed errors of the Kubernetes adapter: each names the API server or the object involved."""

from __future__ import annotations

from autoscaler.errors import AutoscalerError


class ClusterError(AutoscalerError):
    """Base class of the adapter's errors."""


class ClusterUnreachable(ClusterError):
    """The API server gave no answer (down, wrong address, TLS or credentials not loadable)."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        super().__init__(f"Kubernetes API server at {url} unreachable: {message}")


class ClusterApiError(ClusterError):
    """The API server answered an error status to `operation`."""

    def __init__(self, operation: str, status: int, message: str) -> None:
        self.operation = operation
        self.status = status
        super().__init__(f"{operation} failed with HTTP {status}: {message}")


class ScaleConflict(ClusterError):
    """Another writer kept changing the object between our read and our write."""

    def __init__(
        self, namespace: str, name: str, conflicts: int, what: str = "scale write"
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.conflicts = conflicts
        super().__init__(
            f"{what} of {namespace}/{name} lost {conflicts} optimistic-concurrency races (409); "
            "another writer is changing it, so the controller gives up this cycle"
        )
