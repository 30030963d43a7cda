"""The CUDA driver's checkpoint API, called in-process through ctypes (no exec per call).

cuCheckpointProcessLock / Checkpoint / Restore / Unlock / GetState act on another process named
by PID (as seen from the agent's pid namespace). Lock + Checkpoint moves the target's GPU memory
into its host memory and releases the GPU, so CRIU then dumps it as ordinary pages; Restore +
Unlock after a CRIU restore puts it back, optionally onto other GPUs (UUID pairs, driver >= 570).

Errors are typed: CudaUnavailable (no libcuda / no GPU), CudaDriverTooOld (a symbol is missing),
CudaNoProcessState (the target never initialised CUDA), CudaError (any other driver error).
"""

from __future__ import annotations

import ctypes
import enum
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.agent.errors import (
    CudaDriverTooOld,
    CudaError,
    CudaNoProcessState,
    CudaUnavailable,
)

LIBCUDA = os.environ.get("AUTOSCALER_LIBCUDA", "libcuda.so.1")
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_NOT_FOUND = 500
CUDA_ERROR_NOT_SUPPORTED = 801
CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetState",
)


class ProcessState(enum.IntEnum):
    """CUprocessState."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class CUuuid(ctypes.Structure):
    # unsigned bytes, not c_char: a c_char array reads back only up to the first NUL byte
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointGpuPair(ctypes.Structure):
    """Which GPU (by UUID) a checkpointed process's device state moves to on restore."""

    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointRestoreArgs(ctypes.Structure):
    """cuda.h: gpuPairs pointer, gpuPairsCount, char reserved[52 - sizeof(ptr)], u64 reserved1."""

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
        ("reserved1", ctypes.c_uint64),
    ]


def parse_gpu_uuid(text: str) -> bytes:
    """'GPU-6b5f...-...' (nvidia-smi form) or 32 hex digits -> the 16 raw bytes of a CUuuid."""
    hexpart = text.removeprefix("GPU-").replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", hexpart):
        raise ValueError(f"not a GPU UUID: {text!r} (expected GPU-xxxxxxxx-xxxx-... or 32 hex)")
    return bytes.fromhex(hexpart)


def format_gpu_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def build_restore_args(pairs: Sequence[tuple[str, str]]) -> CUcheckpointRestoreArgs:
    """RestoreArgs remapping each (old GPU UUID, new GPU UUID); keeps the array alive on it."""
    args = CUcheckpointRestoreArgs()
    if pairs:
        array = (CUcheckpointGpuPair * len(pairs))()
        for i, (old, new) in enumerate(pairs):
            array[i].oldUuid.bytes = (ctypes.c_ubyte * 16).from_buffer_copy(parse_gpu_uuid(old))
            array[i].newUuid.bytes = (ctypes.c_ubyte * 16).from_buffer_copy(parse_gpu_uuid(new))
        args.gpuPairs = ctypes.cast(array, ctypes.POINTER(CUcheckpointGpuPair))
        args.gpuPairsCount = len(pairs)
        args._pairs_keepalive = array  # type: ignore[attr-defined]
    return args


def process_uses_cuda(pid: int) -> bool:
    """True when the process has the CUDA driver library mapped (it initialised CUDA)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libcuda.so" in line for line in f)
    except FileNotFoundError as exc:
        raise ProcessLookupError(f"no process {pid}") from exc


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    uuid: str


class CudaCheckpointAPI:
    """The driver library, loaded once, with the checkpoint calls and a few device queries."""

    def __init__(self, library: str = LIBCUDA) -> None:
        try:
            self.lib = ctypes.CDLL(library)
        except OSError as exc:
            raise CudaUnavailable(
                f"cannot load the CUDA driver library {library!r} ({exc}): "
                "no NVIDIA driver on this machine (or not visible in this container)"
            ) from exc
        self.driver_version = self._driver_version()
        for symbol in CHECKPOINT_SYMBOLS:
            if not hasattr(self.lib, symbol):
                raise CudaDriverTooOld(symbol, self.driver_version)
        self._lock = threading.Lock()
        code = self.lib.cuInit(0)
        if code != CUDA_SUCCESS:
            raise CudaUnavailable(
                f"cuInit failed: CUDA error {code} ({self.error_name(code)}): "
                + ("no GPU visible" if code == CUDA_ERROR_NO_DEVICE else "driver not usable")
            )

    def _driver_version(self) -> int | None:
        if not hasattr(self.lib, "cuDriverGetVersion"):
            return None
        version = ctypes.c_int()
        if self.lib.cuDriverGetVersion(ctypes.byref(version)) != CUDA_SUCCESS:
            return None
        return version.value

    def error_name(self, code: int) -> str:
        if not hasattr(self.lib, "cuGetErrorName"):
            return "unknown"
        name = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
            return "unknown"
        return name.value.decode()

    def _check(self, call: str, code: int, pid: int | None) -> None:
        if code == CUDA_SUCCESS:
            return
        if pid is not None and code in (CUDA_ERROR_NOT_FOUND, CUDA_ERROR_INVALID_VALUE):
            try:
                uses = process_uses_cuda(pid)
            except ProcessLookupError:
                uses = True
            if not uses:
                raise CudaNoProcessState(call, code, self.error_name(code), pid)
        raise CudaError(call, code, self.error_name(code), pid)

    def _require_cuda(self, pid: int) -> None:
        if not process_uses_cuda(pid):
            raise CudaNoProcessState("precheck", CUDA_ERROR_NOT_FOUND, "no CUDA in process", pid)

    def state(self, pid: int) -> ProcessState:
        st = ctypes.c_int()
        self._check(
            "cuCheckpointProcessGetState",
            self.lib.cuCheckpointProcessGetState(ctypes.c_int(pid), ctypes.byref(st)),
            pid,
        )
        return ProcessState(st.value)

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        """Block the process's CUDA calls and wait for its work to finish (0 = no timeout)."""
        self._require_cuda(pid)
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        self._check(
            "cuCheckpointProcessLock",
            self.lib.cuCheckpointProcessLock(ctypes.c_int(pid), ctypes.byref(args)),
            pid,
        )

    def checkpoint(self, pid: int) -> None:
        """Move a locked process's GPU memory into its host memory and release the GPU."""
        self._check(
            "cuCheckpointProcessCheckpoint",
            self.lib.cuCheckpointProcessCheckpoint(ctypes.c_int(pid), None),
            pid,
        )

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        """Re-acquire GPUs and copy the memory back; gpu_pairs remaps (old UUID, new UUID)."""
        args = build_restore_args(gpu_pairs) if gpu_pairs else None
        self._check(
            "cuCheckpointProcessRestore",
            self.lib.cuCheckpointProcessRestore(
                ctypes.c_int(pid), ctypes.byref(args) if args is not None else None
            ),
            pid,
        )

    def unlock(self, pid: int) -> None:
        self._check(
            "cuCheckpointProcessUnlock",
            self.lib.cuCheckpointProcessUnlock(ctypes.c_int(pid), None),
            pid,
        )

    def checkpoint_process(self, pid: int, lock_timeout_ms: int = 0) -> None:
        """Lock then checkpoint; unlocks again if the checkpoint step fails."""
        self.lock(pid, lock_timeout_ms)
        try:
            self.checkpoint(pid)
        except CudaError:
            self.unlock(pid)
            raise

    def restore_process(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        """Restore then unlock: the process runs on the GPU again."""
        self.restore(pid, gpu_pairs)
        self.unlock(pid)

    def devices(self) -> list[Device]:
        """Index, name and UUID of each visible GPU."""
        count = ctypes.c_int()
        self._check("cuDeviceGetCount", self.lib.cuDeviceGetCount(ctypes.byref(count)), None)
        out = []
        for i in range(count.value):
            dev = ctypes.c_int()
            self._check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), i), None)
            name = ctypes.create_string_buffer(256)
            self._check("cuDeviceGetName", self.lib.cuDeviceGetName(name, 256, dev), None)
            uuid = CUuuid()
            get_uuid = getattr(self.lib, "cuDeviceGetUuid_v2", None) or self.lib.cuDeviceGetUuid
            self._check("cuDeviceGetUuid", get_uuid(ctypes.byref(uuid), dev), None)
            out.append(Device(i, name.value.decode(), format_gpu_uuid(bytes(uuid.bytes))))
        return out


def current_device_uuid(library: str = LIBCUDA) -> str | None:
    """The UUID of the GPU the calling thread's CUDA context is on, asked of the driver now
    (a worker restored onto another GPU gets the new one; a cached device property would not
    follow it); None without a context or a driver."""
    try:
        lib = ctypes.CDLL(library)
        dev = ctypes.c_int()
        if lib.cuCtxGetDevice(ctypes.byref(dev)) != CUDA_SUCCESS:
            return None
        uuid = CUuuid()
        get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
        if get_uuid(ctypes.byref(uuid), dev) != CUDA_SUCCESS:
            return None
    except (OSError, AttributeError):
        return None
    return format_gpu_uuid(bytes(uuid.bytes))


_api: CudaCheckpointAPI | None = None
_api_lock = threading.Lock()


def get_api(library: str = LIBCUDA) -> CudaCheckpointAPI:
    """The process-wide API object (loading libcuda and cuInit happen once)."""
    global _api
    with _api_lock:
        if _api is None:
            _api = CudaCheckpointAPI(library)
        return _api


def driver_info() -> dict[str, str | None]:
    """Driver version and GPU model for manifests; None values where there is no GPU."""
    try:
        api = get_api()
    except CudaError:
        return {"driver_version": None, "gpu_model": None}
    version = api.driver_version
    try:
        devices = api.devices()
    except CudaError:
        devices = []
    return {
        "driver_version": None if version is None else f"{version // 1000}.{version % 1000 // 10}",
        "gpu_model": devices[0].name if devices else None,
    }
