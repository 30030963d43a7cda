"""Typed errors of the node agent: each names what failed so a caller can act (or fall back)."""

from __future__ import annotations

from autoscaler.errors import AutoscalerError


class AgentError(AutoscalerError):
    """Base class of every error the node agent raises on purpose."""


# --- artifacts -------------------------------------------------------------------------------
class InvalidArtifactId(AgentError, ValueError):
    """An artifact id does not match the strict pattern (guards against path escapes)."""

    def __init__(self, artifact_id: object, pattern: str) -> None:
        self.artifact_id = artifact_id
        super().__init__(f"invalid artifact id {artifact_id!r}: must match {pattern}")


class ArtifactNotFound(AgentError, LookupError):
    """No complete artifact with this id exists where it was looked for."""

    def __init__(self, artifact_id: str, where: str) -> None:
        self.artifact_id = artifact_id
        self.where = where
        super().__init__(f"artifact {artifact_id!r} not found in {where}")


class ArtifactExists(AgentError):
    """An artifact with this id is already there; artifacts are immutable once written."""

    def __init__(self, artifact_id: str, where: str) -> None:
        self.artifact_id = artifact_id
        super().__init__(f"artifact {artifact_id!r} already exists in {where}")


class ArtifactCorrupt(AgentError):
    """An artifact failed verification: a file is missing, truncated, extra or has a wrong hash."""

    def __init__(self, artifact_id: str, path: str, reason: str) -> None:
        self.artifact_id = artifact_id
        self.path = path
        self.reason = reason
        super().__init__(f"artifact {artifact_id!r} is corrupt: {path}: {reason}")


class ExternalFileError(AgentError):
    """A file the worker declared it re-reads after a restore (its weights) is unusable: a bad
    declaration, or missing or changing while the checkpoint records it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"external file {path}: {reason}")


class ExternalFileChanged(ExternalFileError):
    """At restore, an external file is missing or differs from what the checkpoint recorded:
    the restored worker would serve other weights. The artifact itself is fine (not
    quarantined); the caller starts cold."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, f"{reason}; the restored worker would re-read other contents "
                               "than were checkpointed, so it is not restored (start cold)")


# --- staging ---------------------------------------------------------------------------------
class NodeMemoryLow(AgentError):
    """Page-locking more would leave the node less available memory than its reserve (or what
    the node has cannot be read, so a pin is not risked)."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


class BudgetExceeded(AgentError):
    """Staging an artifact would exceed the node's disk or memory budget even after eviction."""

    def __init__(self, tier: str, needed: int, available: int) -> None:
        self.tier = tier
        self.needed = needed
        self.available = available
        super().__init__(
            f"{tier} budget exceeded: need {needed} bytes, at most {available} can be freed "
            "(the rest is pinned or in use)"
        )


class StagingError(AgentError):
    """A copy into the node cache failed; nothing half-copied was left behind."""


# --- CRIU ------------------------------------------------------------------------------------
class CriuNotFound(AgentError):
    """No usable CRIU binary (run scripts/install-criu.sh or set AUTOSCALER_CRIU)."""


class CriuError(AgentError):
    """CRIU failed; carries the exit status, the log path and the log's last lines."""

    def __init__(self, operation: str, returncode: int, log_path: str, log_tail: str) -> None:
        self.operation = operation
        self.returncode = returncode
        self.log_path = log_path
        self.log_tail = log_tail
        super().__init__(
            f"criu {operation} failed (exit {returncode}); log {log_path}, last lines:\n{log_tail}"
        )


class PidTaken(AgentError):
    """A restore needs a PID that a live (or zombie) process already holds."""

    def __init__(self, pid: int, where: str) -> None:
        self.pid = pid
        self.where = where
        super().__init__(
            f"cannot restore: PID {pid} is already taken in {where}; "
            "wait for the old process to be gone (and reaped) or restore into a fresh pid namespace"
        )


# --- CUDA ------------------------------------------------------------------------------------
class CudaError(AgentError):
    """A CUDA driver call failed; names the call and the driver's error code and name."""

    def __init__(self, call: str, code: int, name: str, pid: int | None = None) -> None:
        self.call = call
        self.code = code
        self.name = name
        self.pid = pid
        target = f" for pid {pid}" if pid is not None else ""
        super().__init__(f"{call}{target} failed: CUDA error {code} ({name})")


class CudaUnavailable(CudaError):
    """No CUDA driver library or no usable GPU on this machine."""

    def __init__(self, message: str) -> None:
        AgentError.__init__(self, message)
        self.call = "load"
        self.code = -1
        self.name = "unavailable"
        self.pid = None


class CudaDriverTooOld(CudaError):
    """The driver lacks the checkpoint API (added in driver 550; GPU remapping needs newer)."""

    def __init__(self, symbol: str, driver_version: int | None) -> None:
        AgentError.__init__(
            self,
            f"CUDA driver {format_driver_version(driver_version)} has no {symbol}: "
            "the checkpoint API needs driver >= 550 (restore onto other GPUs needs >= 570)",
        )
        self.call = symbol
        self.code = -1
        self.name = "driver too old"
        self.pid = None


class CudaNoProcessState(CudaError):
    """The target process has no CUDA state to checkpoint (it never initialised CUDA)."""


def format_driver_version(version: int | None) -> str:
    """CUDA encodes the driver's CUDA version as 1000*major + 10*minor (12080 -> 12.8)."""
    if version is None:
        return "(unknown version)"
    return f"(CUDA {version // 1000}.{(version % 1000) // 10})"


# --- requests --------------------------------------------------------------------------------
class NotPermitted(AgentError, PermissionError):
    """A request may not touch this process (outside the allowed cgroups / process trees)."""

    def __init__(self, pid: int, reason: str) -> None:
        self.pid = pid
        self.reason = reason
        super().__init__(f"pid {pid} may not be touched: {reason}")


class ProcessNotFound(AgentError, LookupError):
    """The process a request names does not exist (or does not match its namespace PID)."""

    def __init__(self, pid: int, detail: str = "no such process") -> None:
        self.pid = pid
        super().__init__(f"pid {pid}: {detail}")


class WorkerNotReady(AgentError):
    """The worker did not reach the expected handshake state in time."""
