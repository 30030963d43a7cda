"""Artifact store: strict ids, atomic publish, 0600 files, verification on every read."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from autoscaler.agent.errors import (
    ArtifactCorrupt,
    ArtifactExists,
    ArtifactNotFound,
    InvalidArtifactId,
)
from autoscaler.agent.store import (
    ArtifactInfo,
    DirectoryStore,
    Manifest,
    open_store,
    validate_artifact_id,
)


def make_artifact(store: DirectoryStore, artifact_id: str = "a1", size: int = 300_000) -> Manifest:
    with store.create(artifact_id) as w:
        (w.images_dir / "pages-1.img").write_bytes(os.urandom(size))
        (w.images_dir / "pstree.img").write_bytes(b"\x01\x02\x03")
        (w.images_dir / "sub").mkdir()
        (w.images_dir / "sub" / "x.img").write_bytes(b"x" * 10)
        (w.logs_dir / "dump.log").write_text("dump ok\n")
        return w.commit(ArtifactInfo(workload="wl", model={"name": "m"}, root_pid=123,
                                     pids=(123, 124), source_node="node-a"))


@pytest.mark.parametrize("bad", [
    "", ".", "..", "../x", "a/b", "/abs", "a/../b", "A", "-x", "x-", "a..b", "x" * 129,
    "a\x00b", "a b", "é", 7, None,
])
def test_invalid_artifact_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArtifactId):
        validate_artifact_id(bad)


@pytest.mark.parametrize("good", ["a", "qwen3-8b.v2", "w_1-2026-11-23", "0" * 128])
def test_valid_artifact_ids(good: str) -> None:
    assert validate_artifact_id(good) == good


def test_path_traversal_never_touches_outside(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "manifest.json").write_text("{}")
    for bad in ("../secret", "..", "secret/../../x"):
        with pytest.raises(InvalidArtifactId):
            store.open(bad)
        with pytest.raises(InvalidArtifactId):
            store.delete(bad)
    assert (tmp_path / "secret" / "manifest.json").exists()


def test_commit_writes_manifest_and_restricts_permissions(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    manifest = make_artifact(store)
    assert store.list_ids() == ["a1"]
    root = tmp_path / "store" / "a1"
    data = json.loads((root / "manifest.json").read_text())
    assert data["id"] == "a1" and data["workload"] == "wl" and data["source_node"] == "node-a"
    assert set(data["files"]) == {"images/pages-1.img", "images/pstree.img",
                                  "images/sub/x.img", "logs/dump.log"}
    assert data["sizes"]["total"] == manifest.total_bytes == 300_000 + 3 + 10 + 8
    assert data["sizes"]["images"] == 300_013
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    verified = store.open("a1")
    assert verified.manifest == manifest
    assert verified.images_dir == root / "images"
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_an_aborted_write_leaves_nothing(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    with pytest.raises(RuntimeError), store.create("half") as w:
        (w.images_dir / "pages-1.img").write_bytes(b"x" * 1000)
        raise RuntimeError("dump crashed")
    assert not store.exists("half")
    assert store.list_ids() == []
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_a_crash_mid_write_is_not_an_artifact(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    w = store.create("crashed")  # a process killed here leaves only the staging dir
    (w.images_dir / "pages-1.img").write_bytes(b"x" * 1000)
    again = DirectoryStore(tmp_path / "store")
    assert again.list_ids() == []
    with pytest.raises(ArtifactNotFound):
        again.open("crashed")
    assert again.cleanup_staging() == 1


def test_artifacts_are_immutable(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store)
    with pytest.raises(ArtifactExists):
        store.create("a1")


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "extra", "manifest", "link"])
def test_every_kind_of_damage_is_detected(tmp_path: Path, damage: str) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store)
    root = tmp_path / "store" / "a1"
    pages = root / "images" / "pages-1.img"
    if damage == "flip":
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pages.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(pages, 1000)
    elif damage == "missing":
        pages.unlink()
    elif damage == "extra":
        (root / "images" / "intruder.img").write_bytes(b"?")
    elif damage == "manifest":
        (root / "manifest.json").write_text("{not json")
    elif damage == "link":
        pages.unlink()
        pages.symlink_to("/etc/passwd")
    with pytest.raises(ArtifactCorrupt) as info:
        store.open("a1")
    expected = {
        "flip": "blake3 mismatch", "truncate": "truncated", "missing": "missing",
        "extra": "not in the manifest", "manifest": "unreadable manifest", "link": "symbolic",
    }[damage]
    assert expected in str(info.value)


def test_manifest_paths_cannot_escape(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store)
    path = tmp_path / "store" / "a1" / "manifest.json"
    data = json.loads(path.read_text())
    data["files"]["../../outside"] = {"size": 1, "sha256": "0" * 64}
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactCorrupt, match="escapes"):
        store.read_manifest("a1")


def test_quarantine_and_delete(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "q1")
    make_artifact(store, "d1")
    where = Path(store.quarantine("q1", "bad pages"))
    assert where.parent == tmp_path / "store" / ".quarantine"
    assert (where.parent / f"{where.name}.reason").read_text() == "bad pages\n"
    store.delete("d1")
    assert store.list_ids() == []
    with pytest.raises(ArtifactNotFound):
        store.delete("d1")


def test_open_store_locations(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "a")), DirectoryStore)
    shared = open_store(f"shared:{tmp_path / 'b'}")
    assert isinstance(shared, DirectoryStore) and shared.kind == "shared"
    with pytest.raises(ValueError, match="object storage"):
        open_store("s3://bucket/x")


def test_verification_reports_progress(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    manifest = make_artifact(store, size=9 << 20)
    seen: list[tuple[int, int]] = []
    store.open("a1", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (manifest.total_bytes, manifest.total_bytes)
    assert all(d <= t for d, t in seen)


def test_block_digests_locate_damage_and_old_manifests_still_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoscaler.agent import store as store_mod

    monkeypatch.setattr(store_mod, "BLOCK_SIZE", 8 << 20)  # HASH_CHUNK (4 MiB) divides it
    store = DirectoryStore(tmp_path / "store")
    manifest = make_artifact(store, "b1", size=20 << 20)
    assert len(manifest.files["images/pages-1.img"].blocks) == 3
    assert len(manifest.files["images/pages-1.img"].blake3) == 3
    store.open("b1")
    store.open("b1", digest="sha256")
    pages = tmp_path / "store" / "b1" / "images" / "pages-1.img"
    with open(pages, "r+b") as f:
        f.seek((8 << 20) + 5)
        f.write(b"\xff\xfe")
    for digest in ("blake3", "sha256"):
        where = f"{digest} mismatch at bytes {8 << 20}..{16 << 20}"
        with pytest.raises(ArtifactCorrupt, match=where):
            store.open("b1", digest=digest)
    # A manifest without block digests is checked file by file.
    make_artifact(store, "b2", size=1 << 20)
    path = tmp_path / "store" / "b2" / "manifest.json"
    data = json.loads(path.read_text())
    for entry in data["files"].values():
        del entry["blocks"]
        del entry["blake3"]
    path.write_text(json.dumps(data))
    assert store.open("b2").manifest.files["images/pages-1.img"].blocks == ()
    pages = tmp_path / "store" / "b2" / "images" / "pages-1.img"
    with open(pages, "r+b") as f:
        f.seek(5)
        f.write(b"\xff\xfe")
    with pytest.raises(ArtifactCorrupt, match="sha256 mismatch"):
        store.open("b2")


def test_block_digests_are_the_blocks_sha256_and_blake3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sealing hashes blocks on other threads than the whole-file pass: each digest must still
    be of exactly its bytes."""
    import hashlib

    import blake3

    from autoscaler.agent import store as store_mod

    monkeypatch.setattr(store_mod, "BLOCK_SIZE", 8 << 20)
    store = DirectoryStore(tmp_path / "store")
    entry = make_artifact(store, "h1", size=(20 << 20) + 12345).files["images/pages-1.img"]
    data = (tmp_path / "store" / "h1" / "images" / "pages-1.img").read_bytes()
    blocks = [data[i:i + (8 << 20)] for i in range(0, len(data), 8 << 20)]
    assert entry.size == len(data)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.blocks == tuple(hashlib.sha256(b).hexdigest() for b in blocks)
    assert entry.blake3 == tuple(blake3.blake3(b).hexdigest() for b in blocks)
    one_thread = store_mod.hash_file(tmp_path / "store" / "h1" / "images" / "pages-1.img")
    assert one_thread == entry


def test_each_digest_checks_its_own_block_digests(tmp_path: Path) -> None:
    """A manifest whose BLAKE3 digests lie fails the default check and passes sha256's: the
    digest asked for is the one compared, and a bad digest list is a corrupt manifest."""
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "d1")
    path = tmp_path / "store" / "d1" / "manifest.json"
    data = json.loads(path.read_text())
    good = data["files"]["images/pages-1.img"]["blake3"]
    data["files"]["images/pages-1.img"]["blake3"] = ["0" * 64] * len(good)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactCorrupt, match="blake3 mismatch"):
        store.open("d1")
    store.open("d1", digest="sha256")
    data["files"]["images/pages-1.img"]["blake3"] = ["0" * 64] * (len(good) + 1)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactCorrupt, match="bad blake3 block digests"):
        store.open("d1", digest="sha256")
    make_artifact(store, "d2")
    with pytest.raises(ValueError, match="digest must be one of"):
        store.open("d2", digest="md5")
