"""External files under stress: a preloader that never answers, the node's verification record
shared by several agent processes (and damaged), and the `stat` check mode.

The restores use real CRIU and the CPU reference worker, as in test_external_files.py (whose
module-scoped checkpoint, `dumped`, these tests share).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autoscaler.agent import external
from autoscaler.agent.cpu_worker import MLP
from autoscaler.agent.errors import ExternalFileChanged
from autoscaler.agent.restore import RestoreRequest, restore_artifact
from autoscaler.agent.staging import NodeCache

from .conftest import restore_request, restored_ok, wait_for
from .test_external_files import (  # noqa: F401  (dumped: the shared checkpoint fixture)
    PARAMS_SEED,
    MiB,
    answers,
    dumped,
    expected,
    node,
)


def _mark_preloadable(store_root: Path) -> None:
    """A GPU worker declares its weights preloadable; the CPU worker's .npz is not, so mark it
    in this copy's manifest (the manifest is not among the hashed files)."""
    path = store_root / "w" / "manifest.json"
    data = json.loads(path.read_text())
    data["external_files"][0]["preload"] = True
    path.write_text(json.dumps(data))


class HungPreloader:
    """A preloader stand-in that accepts, reads the request and never answers, holding the
    connection until closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict] = []
        self.conns: list[socket.socket] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if buf:
                self.requests.append(json.loads(buf))

    def client_still_waiting(self) -> bool:
        """Every accepted connection is still open on the agent's side (no reply, no EOF)."""
        for conn in self.conns:
            try:
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return False  # the agent gave up and closed its end
            except BlockingIOError:
                continue
        return bool(self.conns)

    def close(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()


# --- 1. a preloader that never answers never holds the restore back --------------------------
@pytest.mark.parametrize("source", ["disk", "store"])
def test_a_hung_preloader_never_holds_the_restore_back(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int], source: str  # noqa: F811
) -> None:
    store, params = node(tmp_path, dumped)
    _mark_preloadable(tmp_path / "store")
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    if source == "disk":  # the disk path sends the request from the check, after the images
        cache.stage(store, "w", "disk")
    hung = HungPreloader(tmp_path / "pre.sock")
    try:
        outcome = restore_artifact(
            # far longer than any restore: an agent that waited for the answer could not have
            # returned while the request is still open
            restore_request(dumped, preload_socket=str(hung.path), preload_timeout_s=600.0),
            cache=cache if source == "disk" else None, store=store,
        )  # fmt: skip
        assert outcome.ok, outcome.reason
        cleanup_pids.append(outcome.host_pid)
        assert outcome.source == source
        assert answers(dumped["port"]) == expected(params)  # the worker read its weights
        assert outcome.preloaded == ()
        (warning,) = outcome.warnings
        assert "had not answered" in warning and str(params) in warning
        assert str(hung.path) in warning
        # The request did reach the stand-in, and the agent is still waiting for the answer
        # after the whole restore finished: the restore never waited for it.
        wait_for(lambda: hung.requests, 30, "the load request at the stand-in")
        assert [(r["op"], r["key"]) for r in hung.requests] == [("load", str(params))]
        assert hung.client_still_waiting()
    finally:
        hung.close()


def test_a_failed_restore_waits_for_an_answered_request_and_takes_it_back(
    tmp_path: Path,
) -> None:
    """release() after a failure: the request still in flight is waited for, then taken back
    (the preloader's GPU memory is needed for the cold start)."""
    from autoscaler.agent.restore import Preloads

    from .test_external_files import PreloaderDouble

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 1000)
    files = external.record_paths([external.Declared(str(weights), preload=True)])
    double = PreloaderDouble(tmp_path / "pre.sock")
    try:
        preloads = Preloads(str(double.path), Path)
        preloads.start(files)  # returns at once; the request goes from its own thread
        preloads.release()
        assert preloads.so_far() == ((str(weights),), ())
        assert [r["op"] for r in double.requests] == ["load", "take"]
    finally:
        double.close()


# --- 2. the verification record: shared by processes, never trusted when damaged ------------
_WRITER = """
import sys, time
from pathlib import Path
from autoscaler.agent.external import FileIdentity, VerifiedFiles
record, tag, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
go.with_name(f"ready-{tag}").touch()
while not go.exists():
    time.sleep(0.001)
files = VerifiedFiles(record)
for i in range(count):
    files.remember(FileIdentity(tag, i, 100 + i, 1, 2), f"{tag}-{i}", f"/w/{tag}/{i}")
"""


def test_two_processes_updating_the_record_keep_every_entry(tmp_path: Path) -> None:
    """The server and a one-shot CLI command update the same record file at once."""
    record = tmp_path / "meta" / "external-verified.json"
    go = tmp_path / "go"
    count = 150
    command = [sys.executable, "-c", _WRITER, str(record)]
    writers = [subprocess.Popen([*command, str(tag), str(count), str(go)]) for tag in (1, 2)]
    wait_for(lambda: all((tmp_path / f"ready-{t}").exists() for t in (1, 2)), 60, "writers")
    go.touch()  # both start together
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    data = json.loads(record.read_text())
    assert len(data) == 2 * count
    known = external.VerifiedFiles(record)
    for tag in (1, 2):
        for i in range(count):
            assert known.digest_for(external.FileIdentity(tag, i, 100 + i, 1, 2)) == f"{tag}-{i}"
    left = sorted(p.name for p in record.parent.iterdir())  # no temporary file left behind
    assert left == ["external-verified.json", "external-verified.json.lock"]


@pytest.mark.parametrize("damage", [b"{\"1:2\": {\"sha256\": \"ab", b"[1, 2]", b"\xff\x00"])
def test_a_damaged_record_is_treated_as_empty_with_a_warning(
    tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(2 * MiB))
    (entry,) = external.record_paths([external.Declared(str(weights))])
    known = external.VerifiedFiles(tmp_path / "verified.json")
    assert external.check(entry, weights, known).how == "hashed"
    assert external.check(entry, weights, known).how == "record"
    known.path.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="autoscaler.agent.external"):
        assert external.state(entry, weights, known) == "unverified"  # nothing trusted
        assert external.check(entry, weights, known).how == "hashed"  # and no crash
    warnings = [r for r in caplog.records if "verified external files" in r.getMessage()]
    assert len(warnings) == 1 and str(known.path) in warnings[0].getMessage()
    assert "hashed again" in warnings[0].getMessage()
    assert external.check(entry, weights, known).how == "record"  # rewritten whole


def test_a_damaged_record_makes_the_restore_hash_the_weights_and_go_on(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    store, params = node(tmp_path, dumped)
    cache = NodeCache(tmp_path / "disk", 1 << 30, tmp_path / "shm", 1 << 30)
    cache.stage(store, "w", "memory")  # verified on this node
    assert cache.external_states(store.read_manifest("w"))[0]["state"] == "verified"
    cache.verified.path.write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING, logger="autoscaler.agent.external"):
        outcome = restored_ok(dumped, cleanup_pids, cache=cache, store=store)
    assert [(f["path"], f["how"]) for f in outcome.external_files] == [(str(params), "hashed")]
    assert answers(dumped["port"]) == expected(params)
    assert any("verified external files" in r.getMessage() for r in caplog.records)
    assert cache.external_states(store.read_manifest("w"))[0]["state"] == "verified"


# --- 3. the stat check mode -------------------------------------------------------------------
def test_stat_mode_trusts_size_and_mtime_and_hashes_otherwise(tmp_path: Path) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(3 * MiB))
    (entry,) = external.record_paths([external.Declared(str(weights))])
    assert external.check(entry, weights, None, mode="hash").how == "hashed"
    assert external.check(entry, weights, None, mode="stat").how == "stat"
    # What "stat" gives up: other bytes, same size, mtime put back, go unseen; "hash" sees them.
    before = weights.stat()
    with open(weights, "r+b") as f:
        f.write(b"\x00" * 8)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert external.check(entry, weights, None, mode="stat").how == "stat"
    with pytest.raises(ExternalFileChanged, match="content changed"):
        external.check(entry, weights, None, mode="hash")
    # Another mtime: not trusted, hashed (and found changed).
    os.utime(weights)
    with pytest.raises(ExternalFileChanged, match="content changed"):
        external.check(entry, weights, None, mode="stat")
    # A size that differs fails in both modes without a read.
    weights.write_bytes(os.urandom(MiB))
    with pytest.raises(ExternalFileChanged, match="bytes, the checkpoint recorded"):
        external.check(entry, weights, None, mode="stat")
    with pytest.raises(ValueError, match="external check mode"):
        external.check(entry, weights, None, mode="trust")
    with pytest.raises(ValueError, match="external_check"):
        RestoreRequest(artifact_id="w", external_check="trust")


@pytest.mark.parametrize(("mode", "how"), [("hash", "hashed"), ("stat", "stat")])
def test_restore_checks_unverified_weights_by_hash_or_by_stat(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int], mode: str, how: str,  # noqa: F811
) -> None:  # fmt: skip
    store, params = node(tmp_path, dumped)  # the file as recorded: same size and mtime
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    cache.stage(store, "w", "disk")  # no warm: the weights are not verified on this node
    assert cache.external_states(store.read_manifest("w"))[0]["state"] == "unverified"
    outcome = restored_ok(dumped, cleanup_pids, cache=cache, store=store, external_check=mode)
    assert [(f["path"], f["how"]) for f in outcome.external_files] == [(str(params), how)]
    assert answers(dumped["port"]) == expected(params)
    # A stat is not a verification: the node's record only holds what was hashed.
    state = cache.external_states(store.read_manifest("w"))[0]["state"]
    assert state == ("verified" if mode == "hash" else "unverified")


def test_the_agents_external_check_option_reaches_its_restores(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int],  # noqa: F811
) -> None:  # fmt: skip
    from autoscaler.agent.server import Agent, AgentConfig, RestoreBody

    store, params = node(tmp_path, dumped)
    agent = Agent(AgentConfig(
        store=store, cache=NodeCache(tmp_path / "disk", 1 << 30),
        handshake_root=dumped["handshake"].parent, external_check="stat",
    ))  # fmt: skip
    outcome = agent.restore(RestoreBody(
        artifact_id="w", handshake_dir=str(dumped["handshake"]),
        health_url=f"http://127.0.0.1:{dumped['port']}/health",
    ), lambda _m: None)  # fmt: skip
    assert outcome["ok"], outcome["reason"]
    cleanup_pids.append(outcome["host_pid"])
    assert [(f["path"], f["how"]) for f in outcome["external_files"]] == [(str(params), "stat")]


def test_stat_mode_still_hashes_weights_with_another_mtime_and_fails_changed_ones(
    tmp_path: Path, dumped: dict,  # noqa: F811
) -> None:  # fmt: skip
    store, params = node(tmp_path, dumped)
    recorded = dumped["manifest"].external_files[0]
    MLP(seed=PARAMS_SEED + 1).save(params)  # other weights, same size, a new mtime
    assert params.stat().st_size == recorded.size
    try:
        outcome = restore_artifact(
            restore_request(dumped, external_check="stat"),
            store=store,
        )  # fmt: skip
    finally:
        MLP(seed=PARAMS_SEED).save(params)  # the other tests' file
    assert outcome.error == "ExternalFileChanged" and "content changed" in (outcome.reason or "")
    wait_for(lambda: not Path(f"/proc/{dumped['pid']}").exists(), 10, "nothing left running")


def test_external_check_is_an_option_of_serve_and_restore() -> None:
    import argparse

    from autoscaler.agent.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for action in ("serve", "restore"):
        extra = ["--id", "a"] if action == "restore" else []
        args = parser.parse_args(["agent", action, "--store", "/s", *extra])
        assert args.external_check == "hash"
        args = parser.parse_args(["agent", action, "--store", "/s", "--external-check", "stat",
                                  *extra])  # fmt: skip
        assert args.external_check == "stat"


def test_nothing_is_left_waiting_on_a_closed_stand_in(tmp_path: Path) -> None:
    """The stand-in's own check: a client that closed its end is seen as gone."""
    hung = HungPreloader(tmp_path / "s.sock")
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(hung.path))
        client.sendall(b'{"op": "load"}\n')
        wait_for(lambda: hung.requests, 10, "the request")
        assert hung.client_still_waiting()
        client.close()
        wait_for(lambda: not hung.client_still_waiting(), 10, "the closed end")
    finally:
        hung.close()


def test_a_large_file_read_from_disk_gets_the_disk_reader_threads() -> None:
    """From disk a large weights file is asked for with DISK_PRELOAD_THREADS (more reads in
    flight), a small one with the preloader's default; from the page cache with
    MEMORY_PRELOAD_THREADS (fewer readers beside CRIU); a caller that fixed its own loader
    gets it."""
    from autoscaler.agent.restore import (
        DISK_PRELOAD_MIN_BYTES,
        DISK_PRELOAD_THREADS,
        MEMORY_PRELOAD_THREADS,
        Preloads,
    )
    from autoscaler.agent.store import ExternalFile

    big = ExternalFile("/m/w.safetensors", DISK_PRELOAD_MIN_BYTES, 1, "0" * 64, preload=True)
    small = ExternalFile("/m/s.safetensors", DISK_PRELOAD_MIN_BYTES - 1, 1, "0" * 64)
    preloads = Preloads("/run/pre.sock", Path)
    assert preloads.threads_for(big, from_disk=True) == DISK_PRELOAD_THREADS
    assert preloads.threads_for(small, from_disk=True) is None  # the preloader's default
    assert preloads.threads_for(big, from_disk=False) == MEMORY_PRELOAD_THREADS
    assert preloads.threads_for(small, from_disk=False) == MEMORY_PRELOAD_THREADS
    fixed = Preloads("/run/pre.sock", Path, threads=16, disk_threads=None)
    assert fixed.threads_for(big, from_disk=True) == 16
    assert fixed.threads_for(big, from_disk=False) == 16
