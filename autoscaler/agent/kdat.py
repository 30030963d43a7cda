"""CRIU's kernel-feature cache (`/run/criu.kdat`) on nodes whose /run is not a tmpfs.

Every CRIU run begins by probing the kernel (a veth pair in a new netns, CPU features, ...),
~0.04-0.1 s of a 0.7 s restore on the H200 (docs/restore-benchmark.md), unless it finds
`/run/criu.kdat`. CRIU writes that file itself only where /run is a tmpfs, so that a reboot,
perhaps into another kernel, clears it. On the GPU machines /run is on the root disk and the
probes run on every dump and restore.

So the agent makes the file: `criu check` in a private mount namespace with a tmpfs on /run
(where CRIU does write it), copied out beside a stamp naming the boot and the CRIU binary it
is good for. A cache from another boot or another CRIU is replaced before CRIU could read it,
and CRIU's own check of the file's magic turns away one from another CRIU build regardless.

It is only a speed-up: `ensure` never raises. What it did is returned ("written", "cached",
"tmpfs": CRIU keeps its own, or "unavailable: why") and recorded with the restore, so a node
where it cannot work says so and CRIU probes as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import subprocess
import threading
from pathlib import Path

KDAT_FILE = Path("run/criu.kdat")  # CRIU's KDAT cache path, relative to the root CRIU sees
STAMP_FILE = Path("run/criu.kdat.autoscaler")  # which boot and CRIU the cache was made for
TMPFS_MAGIC = 0x01021994
GENERATE_TIMEOUT_S = 60.0

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()
_made: dict[tuple[str, str], bytes] = {}  # (boot id, CRIU identity) -> the cache's bytes
_versions: dict[str, str] = {}  # CRIU path, size and mtime -> its --version output


def boot_id() -> str:
    """This boot's id: a cache from another boot may describe another kernel."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def criu_identity(criu: Path) -> str:
    """The CRIU the cache belongs to: its path, size, mtime and --version (once per process)."""
    resolved = criu.resolve()
    st = resolved.stat()
    key = f"{resolved} {st.st_size} {st.st_mtime_ns}"
    if key not in _versions:
        out = subprocess.run(
            [str(resolved), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        _versions[key] = " ".join(out.split())
    return f"{key} {_versions[key]}"


def is_tmpfs(path: Path) -> bool:
    """Whether path is on a tmpfs, where CRIU keeps its cache itself."""
    return _statfs_type(path) == TMPFS_MAGIC


def _statfs_type(path: Path) -> int:
    # os.statvfs has no f_type; struct statfs begins with it on every Linux ABI
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs: {os.strerror(err)}", str(path))
    return ctypes.c_long.from_buffer(buf).value


def generate(criu: Path) -> bytes:
    """The cache CRIU writes after probing this kernel, made where /run is a private tmpfs."""
    script = (
        "mount -t tmpfs -o size=1m,mode=0755 autoscaler-kdat /run && "
        f"{shlex.quote(str(criu))} check >/dev/null 2>&1; "
        "cat /run/criu.kdat"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, timeout=GENERATE_TIMEOUT_S, check=False,
    )  # fmt: skip
    if proc.returncode != 0 or not proc.stdout:
        why = proc.stderr.decode(errors="replace").strip()[-300:] or f"exit {proc.returncode}"
        raise OSError(f"criu check left no cache in a private /run: {why}")
    return proc.stdout


def _stamp(boot: str, identity: str, data: bytes) -> dict[str, str]:
    return {"boot_id": boot, "criu": identity, "sha256": hashlib.sha256(data).hexdigest()}


def _current(kdat: Path, stamp: Path, boot: str, identity: str) -> bool:
    """Whether kdat is the file a stamp made for this boot and this CRIU vouches for."""
    try:
        have = json.loads(stamp.read_text())
        data = kdat.read_bytes()
    except (OSError, ValueError):
        return False
    return have == _stamp(boot, identity, data)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure(criu: Path, root: Path = Path("/")) -> str:
    """Make sure the CRIU that runs under `root` finds a cache for this boot. Never raises.

    root: "/" for CRIU on the host, `/proc/<pid>/root` for CRIU run in a pod's mount
    namespace (the cache is then written into that pod's /run).
    """
    try:
        run_dir = root / "run"
        if not run_dir.is_dir():
            return f"unavailable: no {run_dir}"
        if is_tmpfs(run_dir):
            return "tmpfs"
        key = (boot_id(), criu_identity(criu))
        kdat, stamp = root / KDAT_FILE, root / STAMP_FILE
        with _lock:
            if _current(kdat, stamp, *key):
                return "cached"
            data = _made.get(key)
            if data is None:
                data = _made[key] = generate(criu)
            # the cache first: a stamp never vouches for a file not yet in place
            stamp.unlink(missing_ok=True)
            _write_atomically(kdat, data)
            _write_atomically(stamp, json.dumps(_stamp(*key, data)).encode())
        return "written"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return f"unavailable: {exc}"
