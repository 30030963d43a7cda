"""CPU-side tests of the fast weight loader (autoscaler.agent.fastload) and of the GPU worker's
pure parts (shapes, file layout). No torch, no GPU: the reader runs into host buffers."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from autoscaler.agent import fastload
from autoscaler.agent.fastload import (
    HostSink,
    WeightFileError,
    load_file_to_host,
    load_range,
    plan_chunks,
    read_layout,
    write_safetensors,
)
from autoscaler.agent.gpu_worker import (
    SHAPES,
    fixed_prompt,
    kv_cache_bytes,
    parameter_count,
    parameter_table,
)


def _random_tensors(seed: int, specs: list[tuple[str, str, tuple[int, ...]]]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _, dtype, shape in specs:
        size = int(np.prod(shape)) * fastload.DTYPE_SIZES[dtype]
        out.append(rng.integers(0, 256, size=size, dtype=np.uint8))
    return out


SPECS = [
    ("a.weight", "BF16", (64, 33)),
    ("b.bias", "F32", (7,)),
    ("c.table", "I64", (3, 5)),
    ("d.empty", "F16", (0,)),
    ("e.big", "BF16", (1000, 129)),
]


@pytest.fixture()
def weights_file(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    data = _random_tensors(1, SPECS)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, SPECS, data, metadata={"model": "test"})
    return path, data


def test_write_then_read_layout_round_trips(weights_file):
    path, data = weights_file
    layout = read_layout(path)
    assert layout.names() == [name for name, _, _ in SPECS]
    assert layout.metadata == {"model": "test"}
    assert layout.data_offset % fastload.HEADER_ALIGN == 0
    assert layout.file_bytes == path.stat().st_size
    raw = path.read_bytes()
    for (name, dtype, shape), arr in zip(SPECS, data, strict=True):
        entry = layout.entry(name)
        assert entry.dtype == dtype and entry.shape == shape
        got = raw[layout.data_offset + entry.start : layout.data_offset + entry.end]
        assert got == arr.tobytes()


def test_header_is_valid_safetensors_json(weights_file):
    """Other readers must accept the file: 8-byte length, JSON header, offsets per tensor."""
    path, _ = weights_file
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"model": "test"}
    assert header["a.weight"] == {"dtype": "BF16", "shape": [64, 33], "data_offsets": [0, 4224]}


@pytest.mark.parametrize(
    ("threads", "chunk"),
    [(1, 1 << 20), (3, 4096), (8, 1000), (16, 7), (4, 1 << 30)],
)
def test_parallel_load_gives_the_exact_bytes(weights_file, threads, chunk):
    path, data = weights_file
    layout, dest, stats = load_file_to_host(path, threads=threads, chunk_bytes=chunk)
    assert bytes(dest) == b"".join(a.tobytes() for a in data)
    assert stats.bytes == layout.data_bytes
    assert 1 <= stats.threads <= threads


def test_load_range_places_bytes_at_the_destination_offset(tmp_path):
    path = tmp_path / "blob"
    payload = os.urandom(100_003)
    path.write_bytes(payload)
    dest = bytearray(120_000)
    load_range(path, HostSink(dest), 10, 100_003, dst_offset=500, threads=5, chunk_bytes=4096)
    assert bytes(dest[500 : 500 + 99_993]) == payload[10:]
    assert dest[:500] == bytearray(500)
    assert dest[500 + 99_993 :] == bytearray(120_000 - 500 - 99_993)


def test_plan_chunks_covers_the_range_once_round_robin():
    plan = plan_chunks(100, 1100, 64, 3)
    flat = sorted(c for per in plan for c in per)
    covered = []
    for off, n in flat:
        covered.extend(range(off, off + n))
    assert covered == list(range(100, 1100))
    assert [off for off, _ in plan[0][:2]] == [100, 100 + 3 * 64]  # thread 0: chunks 0, 3, ...
    with pytest.raises(ValueError):
        plan_chunks(0, 10, 0, 1)


def test_truncated_file_is_refused_before_any_load(weights_file, tmp_path):
    path, _ = weights_file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match=r"truncated|data section"):
        read_layout(cut)


def test_file_shrunk_during_a_load_is_an_error(weights_file):
    path, _ = weights_file
    layout = read_layout(path)
    dest = bytearray(layout.data_bytes + 4096)
    with pytest.raises(WeightFileError, match="end of file"):
        load_range(path, HostSink(dest), layout.data_offset, layout.file_bytes + 4096, 0, 2, 1024)


def _file_with_header(tmp_path: Path, header: object, data: bytes = b"") -> Path:
    body = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"x", "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"x" * 4, "needs 8"),
        ({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"x", "bad shape"),
        ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}}, b"xx", "bad data_offsets"),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"xxx",
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                "b": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
            },
            b"xxx",
            "hole",
        ),
        ({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"xy", "cover 1"),
        ([1, 2], b"", "not a JSON object"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_headers_name_the_problem(tmp_path, header, data, match):
    path = _file_with_header(tmp_path, header, data)
    with pytest.raises(WeightFileError, match=match) as info:
        read_layout(path)
    assert str(path) in str(info.value)


def test_non_json_and_oversized_headers_are_refused(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(WeightFileError, match="not JSON"):
        read_layout(path)
    path.write_bytes(struct.pack("<Q", fastload.MAX_HEADER_BYTES + 1))
    with pytest.raises(WeightFileError, match="exceeds"):
        read_layout(path)
    path.write_bytes(b"abc")
    with pytest.raises(WeightFileError, match="too short"):
        read_layout(path)
    with pytest.raises(WeightFileError, match="cannot open"):
        read_layout(tmp_path / "missing")


def test_writer_checks_buffers_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "w.safetensors"
    specs = [("a", "F32", (2,)), ("b", "U8", (3,))]
    with pytest.raises(ValueError, match="needs 3"):
        write_safetensors(path, specs, [np.zeros(2, np.float32), np.zeros(4, np.uint8)])
    with pytest.raises(ValueError, match="no buffer"):
        write_safetensors(path, specs, [np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match="more buffers"):
        write_safetensors(path, specs, [np.zeros(2, np.float32), np.zeros(3, np.uint8), b"x"])
    assert list(tmp_path.iterdir()) == []


def test_prefetch_reads_every_byte_and_evict_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(70_000))
    b.write_bytes(b"")
    assert fastload.prefetch([a, b], threads=3, chunk_bytes=4096) == 70_000
    fastload.evict_from_page_cache(a)
    assert 0.0 <= fastload.page_cache_fraction(a) <= 1.0
    fastload.prefetch([a])
    assert fastload.page_cache_fraction(a) == 1.0  # just read: resident
    assert fastload.page_cache_fraction(b) == 1.0  # empty file: nothing to miss


# --- the GPU worker's model shapes -----------------------------------------------------------
def test_qwen3_shapes_have_the_published_parameter_counts():
    # Qwen3-0.6B: 0.6 B parameters with tied embeddings (0.44 B without embeddings);
    # Qwen3-8B: 8.2 B (6.95 B without embeddings)
    assert parameter_count(SHAPES["0.6b"]) == 596_049_920
    assert parameter_count(SHAPES["8b"]) == 8_190_735_360
    names = [n for n, _ in parameter_table(SHAPES["8b"])]
    assert "lm_head.weight" in names and len(names) == len(set(names)) == 2 + 36 * 11 + 1
    assert "lm_head.weight" not in [n for n, _ in parameter_table(SHAPES["0.6b"])]


def test_weight_file_layout_for_a_model_matches_its_table(tmp_path):
    shape = SHAPES["tiny"]
    table = parameter_table(shape)
    specs = [(n, "BF16", dims) for n, dims in table]
    write_safetensors(tmp_path / "t.safetensors", specs, _random_tensors(0, specs))
    layout = read_layout(tmp_path / "t.safetensors")
    assert {e.name: e.shape for e in layout.tensors} == dict(table)
    assert layout.data_bytes == 2 * parameter_count(shape)
    assert all(e.start % 2 == 0 for e in layout.tensors)  # bf16 views need even offsets


def test_prompt_and_kv_sizes():
    prompt = fixed_prompt(SHAPES["8b"], 16)
    assert len(prompt) == 16 and all(0 <= t < SHAPES["8b"].vocab for t in prompt)
    assert prompt == fixed_prompt(SHAPES["8b"], 16)
    # K and V, 36 layers, 8 KV heads of 128, bf16, 64 positions
    assert kv_cache_bytes(SHAPES["8b"], 64) == 2 * 36 * 64 * 8 * 128 * 2


# --- the preloader's hand-over protocol (JSON line + file descriptor over a Unix socket) ------
def test_json_and_descriptor_cross_a_unix_socket():
    import socket

    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        fastload._send_json(a, {"ok": True, "alloc_bytes": 4096}, [r])
        reply, fds = fastload._recv_json(b, want_fds=1)
        assert reply == {"ok": True, "alloc_bytes": 4096} and len(fds) == 1
        os.write(w, b"hi")
        assert os.read(fds[0], 2) == b"hi"  # the received descriptor is the same pipe
        os.close(fds[0])
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_take_preloaded_reports_the_preloaders_refusal(tmp_path):
    import socket
    import threading

    path = str(tmp_path / "p.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            req, _ = fastload._recv_json(conn)
            assert req == {"op": "take", "path": "/w.safetensors"}
            fastload._send_json(conn, {"ok": False, "error": "no preload of /w.safetensors"})

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(RuntimeError, match=r"no preload of /w\.safetensors"):
            fastload.take_preloaded(path, "/w.safetensors", timeout_s=10)
    finally:
        t.join()
        srv.close()
    with pytest.raises(OSError):
        fastload.take_preloaded(str(tmp_path / "absent.sock"), "/w", timeout_s=1)


def test_context_limits_spec_parses_names_and_bytes():
    from autoscaler.agent.gpu_worker import parse_limits

    assert parse_limits("") == {}
    assert parse_limits("stack=0, printf_fifo=4096") == {"stack": 0, "printf_fifo": 4096}


@pytest.mark.parametrize("spec", ["stack", "heap=1", "stack=-1", "stack=1k"])
def test_context_limits_spec_rejects_bad_items_by_name(spec):
    from autoscaler.agent.gpu_worker import parse_limits

    with pytest.raises(ValueError, match="bad context limit"):
        parse_limits(spec)


class _PinLedger:
    """Stands in for cudaHostRegister / cudaHostUnregister: records what is pinned."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.pinned: list[bytearray] = []
        self.freed: list[bytearray] = []
        self.fail_after = fail_after

    def make(self, nbytes: int) -> bytearray:
        if self.fail_after is not None and len(self.pinned) >= self.fail_after:
            raise RuntimeError("cudaHostRegister failed")
        area = bytearray(nbytes)
        self.pinned.append(area)
        return area

    def free(self, area: bytearray) -> None:
        self.freed.append(area)


def test_pinned_areas_are_pinned_once_and_lent_to_readers_of_their_chunk_size() -> None:
    ledger = _PinLedger()
    pool = fastload.PinnedAreas(2, 8 << 20, ledger.make, ledger.free)
    assert [len(a) for a in ledger.pinned] == [16 << 20, 16 << 20]  # two chunks per reader
    assert pool.acquire(16 << 20) is None  # larger chunks: the reader pins its own
    first, second = pool.acquire(8 << 20), pool.acquire(1 << 20)  # a small file's chunks fit
    assert first is not None and second is not None and first is not second
    assert pool.acquire(8 << 20) is None  # all lent: the next reader pins its own
    pool.release(first)
    assert pool.idle == 1
    assert pool.acquire(8 << 20) is first  # the same pinned memory, no new pinning
    assert len(ledger.pinned) == 2
    pool.release(first)
    pool.close()  # unpins the idle one; `second` is still lent out
    assert ledger.freed == [first]
    assert pool.idle == 0


def test_pinned_areas_that_fail_to_pin_unpin_what_was_made() -> None:
    ledger = _PinLedger(fail_after=1)
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        fastload.PinnedAreas(3, 1 << 20, ledger.make, ledger.free)
    assert ledger.freed == ledger.pinned and len(ledger.freed) == 1
    with pytest.raises(ValueError, match="chunk_bytes"):
        fastload.PinnedAreas(1, 0, ledger.make, ledger.free)


def test_a_held_load_answers_a_new_request_only_for_the_same_unchanged_file(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 4096)
    identity = fastload.file_identity(weights)
    held = fastload._PreloadJob(str(weights), threads=4, chunk_bytes=1 << 20, identity=identity)
    assert fastload.can_keep(held, fastload.file_identity(weights))  # loading or loaded: kept
    os.utime(weights, ns=(1, 1))  # rewritten (or touched): read it again
    assert not fastload.can_keep(held, fastload.file_identity(weights))
    failed = fastload._PreloadJob(str(weights), 4, 1 << 20, identity=identity, error="OOM")
    assert not fastload.can_keep(failed, identity)
    unknown = fastload._PreloadJob(str(weights), 4, 1 << 20)  # no identity recorded
    assert not fastload.can_keep(unknown, ())


def test_the_fork_probe_reports_what_its_child_read() -> None:
    """gpu_worker --fork-after-restore: a real fork whose child hashes memory made before it;
    /health then carries the child's verdict (the restore benchmark reads it)."""
    from autoscaler.agent.gpu_worker import ForkProbe

    info: dict = {}
    probe = ForkProbe(info, mib=1)
    probe.fork()
    assert info["fork_after_restore"]["state"] in ("running", "exited")
    deadline = time.monotonic() + 30
    while info["fork_after_restore"]["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    report = info["fork_after_restore"]
    assert report["state"] == "exited" and report["exit_status"] == 0 and report["matches"]
    probe.data[0] ^= 0xFF  # memory that no longer matches: the child says so
    probe.fork()
    while info["fork_after_restore"]["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert info["fork_after_restore"]["matches"] is False


def test_registrations_lock_a_file_once_and_serve_loads_of_that_unchanged_file_only(
    tmp_path,
) -> None:
    """HostRegistrations' bookkeeping, with the CUDA page-locking injected: one lock per file
    identity, found by identity (a pod reads the same file under another name), a changed
    file locked afresh and its old lock let go, nothing let go while a load copies from it."""
    from autoscaler.agent.fastload import HostRegistrations, file_identity

    locked: dict[int, str] = {}
    unlocked: list[int] = []

    def lock(path: str) -> tuple[int, int]:
        ptr = 0x1000 * (len(locked) + 1)
        locked[ptr] = path
        return ptr, os.path.getsize(path)

    regs = HostRegistrations(lock, lambda ptr, _n: unlocked.append(ptr))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 100)
    first = regs.register(str(weights))
    assert first["held"] is False and first["bytes"] == 100
    assert regs.register(str(weights))["held"] is True and len(locked) == 1
    alias = tmp_path / "alias"  # the same file under another name
    alias.symlink_to(weights)
    with regs.borrowed(file_identity(alias)) as reg:
        assert reg is not None and reg.ptr == 0x1000
    time.sleep(0.01)
    weights.write_bytes(b"y" * 200)  # rewritten: its identity changes
    with regs.borrowed(file_identity(weights)) as reg:
        assert reg is None  # the lock is of the old contents
    assert regs.register(str(weights))["held"] is False
    assert unlocked == [0x1000] and regs.paths() == [str(weights)]

    # unregistering waits for a load copying from it
    import threading

    borrowing, release = threading.Event(), threading.Event()

    def load() -> None:
        with regs.borrowed(file_identity(weights)) as reg:
            assert reg is not None
            borrowing.set()
            release.wait(10)

    t = threading.Thread(target=load)
    t.start()
    assert borrowing.wait(10)
    dropper = threading.Thread(target=regs.unregister, args=(str(weights),))
    dropper.start()
    time.sleep(0.05)
    assert unlocked == [0x1000]  # still in use
    with regs.borrowed(file_identity(weights)) as reg:
        assert reg is None  # being dropped: no new load takes it
    release.set()
    t.join(10)
    dropper.join(10)
    assert unlocked == [0x1000, 0x2000] and regs.paths() == []
    assert regs.unregister(str(weights)) is False
