"""CUDA checkpoint API wrapper: error paths on a machine without a GPU, and the ABI layout."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest

from autoscaler.agent import cuda
from autoscaler.agent.errors import CudaDriverTooOld, CudaError, CudaUnavailable


def test_no_driver_library_is_a_clear_error() -> None:
    with pytest.raises(CudaUnavailable, match="cannot load the CUDA driver library"):
        cuda.CudaCheckpointAPI("libcuda-does-not-exist.so.1")


def test_a_library_without_the_checkpoint_symbols_is_a_driver_too_old() -> None:
    libc = ctypes.util.find_library("c")
    assert libc
    with pytest.raises(CudaDriverTooOld) as info:
        cuda.CudaCheckpointAPI(libc)
    assert "cuCheckpointProcessLock" in str(info.value)
    assert "550" in str(info.value)
    assert isinstance(info.value, CudaError)


def test_this_process_has_no_cuda_state() -> None:
    assert cuda.process_uses_cuda(os.getpid()) is False
    with pytest.raises(ProcessLookupError):
        cuda.process_uses_cuda(2**22 + 12345)


def test_driver_info_without_gpu_is_empty_not_an_error() -> None:
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver; the no-GPU path cannot be observed")
    assert cuda.driver_info() == {"driver_version": None, "gpu_model": None}


def test_restore_args_layout_matches_cuda_h() -> None:
    # cuda.h: { CUcheckpointGpuPair *gpuPairs; unsigned gpuPairsCount;
    #           char reserved[52 - sizeof(ptr)]; cuuint64_t reserved1; }
    assert ctypes.sizeof(cuda.CUcheckpointRestoreArgs) == 64
    assert cuda.CUcheckpointRestoreArgs.gpuPairsCount.offset == 8
    assert cuda.CUcheckpointRestoreArgs.reserved1.offset == 56
    assert ctypes.sizeof(cuda.CUcheckpointGpuPair) == 32
    assert ctypes.sizeof(cuda.CUcheckpointLockArgs) == 64


def test_gpu_pairs_are_packed_as_raw_uuids() -> None:
    old = "GPU-6b5f1c2a-0d3e-4f50-8a9b-0c1d2e3f4a5b"
    new = "00112233445566778899aabbccddeeff"
    args = cuda.build_restore_args([(old, new)])
    assert args.gpuPairsCount == 1
    pair = args.gpuPairs[0]
    assert bytes(pair.oldUuid.bytes) == bytes.fromhex("6b5f1c2a0d3e4f508a9b0c1d2e3f4a5b")
    assert bytes(pair.newUuid.bytes) == bytes.fromhex(new)
    assert bytes(args.reserved) == b"\0" * len(args.reserved) and args.reserved1 == 0
    assert cuda.format_gpu_uuid(bytes(pair.oldUuid.bytes)) == old
    with pytest.raises(ValueError, match="not a GPU UUID"):
        cuda.parse_gpu_uuid("GPU-123")
