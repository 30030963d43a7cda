"""Worker hooks (the handshake protocol) and the one-shot CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from autoscaler.agent.__main__ import main as agent_main
from autoscaler.agent.cli import parse_size
from autoscaler.agent.errors import WorkerNotReady
from autoscaler.agent.hooks import (
    CHECKPOINT_DONE,
    READY,
    READY_FOR_CHECKPOINT,
    RESTORE_COMPLETE,
    Handshake,
    WorkerHooks,
)
from autoscaler.errors import ConfigError

from .test_store import make_artifact


def test_without_a_handshake_dir_the_worker_starts_cold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOSCALER_HANDSHAKE_DIR", raising=False)
    hooks = WorkerHooks()
    called: list[str] = []
    hooks.before_checkpoint(lambda: called.append("release"))
    assert hooks.checkpoint_point() == "cold"
    assert called == []  # nothing released when nobody asked for a checkpoint
    hooks.ready()


@pytest.mark.parametrize(("answer", "reason"), [(RESTORE_COMPLETE, "restored"),
                                                (CHECKPOINT_DONE, "resumed")])
def test_handshake_round_trip(tmp_path: Path, answer: str, reason: str) -> None:
    hooks = WorkerHooks(tmp_path / "hs")
    order: list[str] = []
    hooks.before_checkpoint(lambda: order.append("release-kv"))
    hooks.after_restore(lambda: order.append("realloc-kv"))
    result: dict[str, str] = {}

    def worker() -> None:
        result["reason"] = hooks.checkpoint_point(timeout_s=30)
        order.append("listen")
        hooks.ready(port=1234)

    thread = threading.Thread(target=worker)
    thread.start()
    agent = Handshake(tmp_path / "hs")
    info = agent.wait_ready_for_checkpoint(30)
    assert order == ["release-kv"]  # released before announcing
    assert isinstance(info["pid"], int)
    if answer == RESTORE_COMPLETE:
        agent.signal_restored(artifact="a1")
    else:
        agent.signal_checkpoint_done()
    ready = agent.wait_ready(30)
    thread.join(10)
    assert result["reason"] == reason
    assert order == ["release-kv", "realloc-kv", "listen"]
    assert ready["reason"] == reason and ready["port"] == 1234
    assert not (tmp_path / "hs" / READY_FOR_CHECKPOINT).exists()


def test_stale_answers_are_cleared_before_a_restore(tmp_path: Path) -> None:
    hs = Handshake(tmp_path)
    hs.write(CHECKPOINT_DONE)
    hs.write(READY)
    hs.prepare_restore()
    assert hs.read(CHECKPOINT_DONE) is None and hs.read(READY) is None
    with pytest.raises(WorkerNotReady, match="ready"):
        hs.wait_ready(0.05)
    with pytest.raises(ValueError):
        hs.path("../escape")


def test_parse_size() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("500M") == 500 << 20
    assert parse_size("20G") == 20 << 30
    assert parse_size("1.5Gi") == int(1.5 * (1 << 30))
    with pytest.raises(ConfigError, match="disk_budget"):
        parse_size("lots", "disk_budget")


def test_the_pin_reserve_is_a_fraction_and_reaches_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import argparse

    from autoscaler.agent.cli import _cache, parse_fraction, register

    assert parse_fraction("0.2", "pin_reserve") == 0.2
    assert parse_fraction("15%", "pin_reserve") == 0.15
    with pytest.raises(ConfigError, match=r"pin_reserve: '1.5' must be at least 0 and under 1"):
        parse_fraction("1.5", "pin_reserve")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))

    def cache_of(*extra: str):
        args = parser.parse_args(["agent", "inventory", "--cache-dir", str(tmp_path), *extra])
        return _cache(args)

    assert cache_of("--pin-reserve", "25%").pin_reserve_fraction == 0.25
    assert cache_of().pin_reserve_fraction == 0.1
    assert agent_main(["inventory", "--cache-dir", str(tmp_path), "--pin-reserve", "lots"]) == 1
    assert "pin_reserve: 'lots' is not a fraction" in capsys.readouterr().err


def test_one_shot_stage_and_inventory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from autoscaler.agent.store import DirectoryStore

    make_artifact(DirectoryStore(tmp_path / "store"), "a1", size=3 << 20)
    common = ["--cache-dir", str(tmp_path / "cache"), "--disk-budget", "1G"]
    assert agent_main(["stage", "--store", str(tmp_path / "store"), "--id", "a1", *common]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["tier"] == "disk"
    assert "100.0%" in out.err  # progress was shown
    assert agent_main(["inventory", *common]) == 0
    inventory = json.loads(capsys.readouterr().out)
    assert [a["artifact_id"] for a in inventory["artifacts"]] == ["a1"]
    assert agent_main(["stage", "--store", str(tmp_path / "store"), "--id", "../x", *common]) == 1
    assert "invalid artifact id" in capsys.readouterr().err
    assert agent_main(["restore", "--store", str(tmp_path / "store"), "--id", "nope",
                       *common]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "ArtifactNotFound"
