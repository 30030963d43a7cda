"""CRIU's kernel-feature cache made by the agent (autoscaler.agent.kdat), with real CRIU."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from autoscaler.agent import kdat


def _root_with_run(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    assert not kdat.is_tmpfs(root / "run"), "this test needs a /tmp that is not a tmpfs"
    return root


def test_cache_is_written_once_and_replaced_when_stale(criu_binary: Path, tmp_path: Path) -> None:
    root = _root_with_run(tmp_path)
    cache, stamp = root / kdat.KDAT_FILE, root / kdat.STAMP_FILE
    assert kdat.ensure(criu_binary, root) == "written"
    assert cache.stat().st_mode & 0o777 == 0o600
    made = cache.read_bytes()
    assert len(made) > 100
    vouched = json.loads(stamp.read_text())
    assert vouched["boot_id"] == kdat.boot_id()
    assert "4." in vouched["criu"]  # CRIU's version is part of what the cache is good for
    assert kdat.ensure(criu_binary, root) == "cached"
    assert cache.read_bytes() == made

    # a cache from another boot (maybe another kernel) is replaced before CRIU reads it
    stamp.write_text(json.dumps(vouched | {"boot_id": "another-boot"}))
    assert kdat.ensure(criu_binary, root) == "written"
    assert json.loads(stamp.read_text())["boot_id"] == kdat.boot_id()

    # so is one whose bytes are not those the stamp vouched for
    cache.write_bytes(b"\0" * len(made))
    assert kdat.ensure(criu_binary, root) == "written"
    assert cache.read_bytes() == made  # the bytes made for this boot and CRIU, from memory

    # a file of unknown origin (no stamp) is replaced too
    stamp.unlink()
    assert kdat.ensure(criu_binary, root) == "written"
    assert stamp.exists()


def test_criu_loads_the_cache_the_agent_wrote(criu_binary: Path, tmp_path: Path) -> None:
    done = kdat.ensure(criu_binary)  # the host's /run, as the agent does for a host restore
    log = tmp_path / "check.log"
    subprocess.run(
        [str(criu_binary), "check", "-v4", "-o", log.name, "--work-dir", str(tmp_path)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    if done == "tmpfs":  # CRIU keeps its own cache there; the agent leaves it alone
        assert not (Path("/") / kdat.STAMP_FILE).exists()
    else:
        assert done in ("written", "cached")
        assert "Loaded kdat cache from /run/criu.kdat" in log.read_text()


def test_a_cache_that_cannot_be_made_is_reported_never_raised(
    criu_binary: Path, tmp_path: Path
) -> None:
    assert kdat.ensure(criu_binary, tmp_path / "no-such-root").startswith("unavailable: no ")
    fake = tmp_path / "criu"  # answers --version, but its `check` leaves no cache
    fake.write_text("#!/bin/sh\necho 'Version: 4.2.1'\n")
    fake.chmod(0o755)
    root = _root_with_run(tmp_path)
    outcome = kdat.ensure(fake, root)
    assert outcome.startswith("unavailable: criu check left no cache"), outcome
    assert not (root / kdat.KDAT_FILE).exists()
    assert not (root / kdat.STAMP_FILE).exists()


def test_agent_serve_makes_the_cache_before_it_listens(criu_binary: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken")
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoscaler.agent", "serve", "--store", str(tmp_path / "store"),
         "--cache-dir", str(tmp_path / "cache"), "--host", "127.0.0.1", "--port", "0",
         "--token-file", str(token)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    watchdog = threading.Timer(60, proc.kill)  # an agent that never says it listens fails
    watchdog.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the agent prints its address once it is ready
            lines.append(line.strip())
            if "listening on" in line:
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=10)
    said = [line for line in lines if "CRIU kernel-feature cache: " in line]
    assert said, lines
    status = said[0].split("CRIU kernel-feature cache: ", 1)[1]
    assert status in ("written", "cached", "tmpfs"), status
    assert lines.index(said[0]) < len(lines) - 1  # before "listening on"
