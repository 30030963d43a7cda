"""The per-GPU weight preloader as deployed, on a real GPU: who may load and take.

    python3 benchmarks/restore/preloader_tickets.py --out benchmarks/results/preloader-per-gpu.json

Starts `fastload preload --socket-dir D --socket-mode 0666` (the DaemonSet's command), checks
it named its socket by the GPU's UUID, files a load of a safetensors file as root (the agent)
with a ticket, then from a process running as another uid (a worker pod's) tries: a load
(must be refused), a take without the ticket and with a wrong one (refused, and the load stays
held), a take with the ticket (must give the allocation), and compares the GPU bytes it
mapped with the file's data section (sha256). Then the agent's take of a second load without
a ticket (the agent's uid needs none). Writes what happened as JSON; exit 1 when any check
failed. Needs root, torch with CUDA and a user `nobody` (uid 65534) allowed to open the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from autoscaler.agent import fastload, preloaders  # noqa: E402

OTHER_UID = 65534

# what the other-uid process runs: each attempt's outcome as one JSON line
TAKER = r"""
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[1])
from autoscaler.agent import fastload
sock, path, ticket, nbytes = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
out = {"uid": os.getuid()}
def attempt(name, fn):
    try:
        out[name] = {"ok": True, "value": fn()}
    except Exception as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
attempt("load", lambda: fastload.request_preload(sock, path, key="other"))
attempt("take_without_ticket", lambda: fastload.take_preloaded(sock, path, 30)[1])
attempt("take_wrong_ticket", lambda: fastload.take_preloaded(sock, path, 30, ticket="x" * 32)[1])
def take():
    import torch
    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda")
    fd, info = fastload.take_preloaded(sock, path, 60, ticket=ticket)
    vmm = fastload.CudaVmm(0)
    handle = vmm.import_fd(fd)
    os.close(fd)
    ptr = vmm.reserve(info["alloc_bytes"])
    vmm.map(ptr, info["alloc_bytes"], handle)
    data = fastload.cuda_bytes(ptr, nbytes, 0).cpu().numpy().tobytes()
    return {"info": info, "sha256": hashlib.sha256(data).hexdigest()}
attempt("take_with_ticket", take)
print(json.dumps(out))
"""


def write_weights(path: Path, mib: int) -> tuple[int, str]:
    """A safetensors file of random bytes; (data bytes, sha256 of the data section)."""
    rng = os.urandom(mib << 20)
    layout = fastload.write_safetensors(path, [("w", "U8", (len(rng),))], [rng])
    return layout.data_bytes, hashlib.sha256(rng).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mib", type=int, default=256, help="size of the test weights file")
    args = p.parse_args()
    from autoscaler.agent.cuda import get_api

    uuid = get_api().devices()[0].uuid
    work = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # socket paths fit 108 bytes
    os.chmod(work, 0o755)
    folder = work / "preload"
    weights = work / "w.safetensors"
    nbytes, digest = write_weights(weights, args.mib)
    os.chmod(weights, 0o644)
    # the other uid imports the package from a copy it can read (the checkout may be private)
    shutil.copytree(REPO / "autoscaler", work / "pkg" / "autoscaler",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    log = open(work / "preloader.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoscaler.agent.fastload", "preload", "--socket-dir",
         str(folder), "--socket-mode", "0666"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    result: dict = {"benchmark": "preloader-per-gpu", "gpu_uuid": uuid, "checks": {}}
    checks = result["checks"]
    try:
        sock = folder / preloaders.socket_name(uuid)
        end = time.time() + 120
        while not sock.exists() and proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        result["sockets"] = sorted(x.name for x in folder.iterdir()) if folder.exists() else []
        checks["socket named by the GPU's UUID"] = sock.exists()
        if not sock.exists():
            raise SystemExit(f"no socket {sock}; see {work / 'preloader.log'}")
        checks["socket mode 0666"] = (sock.stat().st_mode & 0o777) == 0o666
        choice = preloaders.choose(None, str(folder), [uuid])
        checks["the agent's routing finds it"] = choice.socket == str(sock)
        ticket = "t" * 8 + os.urandom(12).hex()
        fastload.request_preload(str(sock), str(weights), ticket=ticket)
        t = time.perf_counter()
        taker = subprocess.run(
            [sys.executable, "-c", TAKER, str(work / "pkg"), str(sock), str(weights), ticket,
             str(nbytes)],
            capture_output=True, text=True, timeout=300, user=OTHER_UID, group=OTHER_UID,
            extra_groups=[], cwd="/", check=False, env={**os.environ, "HOME": str(work)},
        )  # fmt: skip
        result["taker_seconds"] = round(time.perf_counter() - t, 3)
        result["taker_stderr_tail"] = taker.stderr[-2000:]
        seen = json.loads(taker.stdout.strip().splitlines()[-1]) if taker.stdout.strip() else {}
        result["other_uid"] = seen
        checks["ran as another uid"] = seen.get("uid") == OTHER_UID
        checks["a load from another uid is refused"] = (
            seen.get("load", {}).get("ok") is False
            and "only the node agent" in seen["load"]["error"]
        )
        for name in ("take_without_ticket", "take_wrong_ticket"):
            checks[f"{name} is refused"] = (
                seen.get(name, {}).get("ok") is False and "ticket" in seen[name]["error"]
            )
        took = seen.get("take_with_ticket", {})
        checks["take with the ticket maps the weights"] = bool(took.get("ok"))
        checks["the mapped bytes are the file's"] = (took.get("value") or {}).get(
            "sha256"
        ) == digest
        # the agent's own uid takes without a ticket (its release after a failed restore)
        fastload.request_preload(str(sock), str(weights), key="again", ticket=ticket)
        fd, info = fastload.take_preloaded(str(sock), "again", 60)
        os.close(fd)
        checks["the agent's uid takes without the ticket"] = info.get("data_bytes") == nbytes
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        result["preloader_log_tail"] = (work / "preloader.log").read_text()[-2000:]
        result["ok"] = bool(checks) and all(checks.values())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps({"ok": result["ok"], "checks": checks}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
