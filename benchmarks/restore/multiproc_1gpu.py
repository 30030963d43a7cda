"""Two CUDA processes on one GPU, checkpointed and restored as one worker (tp_worker.py).

For each communicator (`tcp`: our own link; `gloo`: torch.distributed), on the GPU machine as
root:
  1. start the two-rank worker (both ranks on GPU 0: `--gpus 0,0`), each holding CUDA state;
  2. checkpoint_group (leave running): lock both, checkpoint each, one CRIU dump of the tree,
     put both back; the ranks rebuild their link at a fresh rendezvous and answer ("before");
  3. kill both, restore_artifact: one CRIU restore, CUDA restore of each with GPU UUID pairs
     (source -> this node's GPU, map_gpus: identity on one GPU, but the pairs path runs), unlock
     both, ranks rebuild their link at another fresh rendezvous; answers ("after") must be
     identical, and come from the same PIDs.
Writes --out (JSON). NCCL is not used: two ranks on one GPU cannot share an NCCL communicator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from autoscaler.agent import criu as criu_mod  # noqa: E402
from autoscaler.agent.cuda import get_api  # noqa: E402
from autoscaler.agent.multiproc import (  # noqa: E402
    GroupCheckpointRequest,
    checkpoint_group,
    map_gpus,
    process_records,
    process_tree,
)
from autoscaler.agent.restore import RestoreRequest, restore_artifact  # noqa: E402
from autoscaler.agent.store import DirectoryStore  # noqa: E402

SEEDS = (0, 1, 2, 3)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout} s")
        time.sleep(0.01)


def answers(port: int) -> list[dict]:
    return [get(f"http://127.0.0.1:{port}/predict?seed={s}") for s in SEEDS]


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)


def one_mode(comm: str, work: Path, store: DirectoryStore) -> dict:
    port, handshake = free_port(), work / f"hs-{comm}"
    worker_log = work / f"worker-{comm}.log"
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks/restore/tp_worker.py"), "--port", str(port),
         "--rendezvous-port", str(free_port()), "--handshake-dir", str(handshake),
         "--device", "cuda", "--gpus", "0,0", "--comm", comm, "--dim", "1024",
         "--hidden", "4096", "--log", str(worker_log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )
    result: dict = {"comm": comm}
    pids: list[int] = [proc.pid]
    try:
        try:
            for rank in (0, 1):
                wait_file(handshake / f"rank-{rank}" / "ready-for-checkpoint", 120)
        except TimeoutError:
            for pid in process_tree(proc.pid) if proc.poll() is None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)  # tp_worker writes its threads' stacks
            time.sleep(1)
            result["stacks"] = {p.name: p.read_text()[-6000:]
                                for p in work.glob(f"worker-{comm}.log.*.stacks")}
            result["rank0_exit"] = proc.poll()
            raise
        result["cold_to_offer_s"] = time.perf_counter() - t0
        pids = process_tree(proc.pid)
        result["pids"] = pids
        api = get_api()
        devices = api.devices()
        result["devices"] = [d.__dict__ for d in devices]
        ckpt = checkpoint_group(store, GroupCheckpointRequest(
            artifact_id=f"tp2-1gpu-{comm}", root_pid=proc.pid, workload="tp2-mlp",
            handshake_dir=str(handshake), ranks=2, leave_running=True,
        ), progress=log)
        records = process_records(ckpt.manifest)
        result["checkpoint_seconds"] = ckpt.seconds
        result["processes"] = [r.__dict__ for r in records]
        result["artifact_bytes"] = ckpt.manifest.total_bytes
        result["cuda_processes"] = sum(r.cuda for r in records)
        for rank in (0, 1):
            wait_file(handshake / f"rank-{rank}" / "ready", 120)
        before = answers(port)
        result["resumed_info"] = get(f"http://127.0.0.1:{port}/info")
        result["state_after_put_back"] = {p: api.state(p).name for p in pids}

        kill_tree(pids)
        proc.wait(timeout=20)
        sources = sorted({u for r in records for u in r.gpu_uuids})
        mapping = map_gpus(sources, [d.uuid for d in devices])
        result["gpu_mapping"] = mapping
        t = time.perf_counter()
        outcome = restore_artifact(
            RestoreRequest(artifact_id=f"tp2-1gpu-{comm}", handshake_dir=str(handshake),
                           health_url=f"http://127.0.0.1:{port}/health",
                           gpu_pairs=tuple(mapping.items())),
            store=store, log_root=work / "restore-logs", progress=log,
        )
        result["restore"] = outcome.to_dict()
        if not outcome.ok:
            raise RuntimeError(f"restore failed: {outcome.error}: {outcome.reason}")
        after = answers(port)
        result["restore_to_first_correct_response_s"] = time.perf_counter() - t
        result["restored_info"] = get(f"http://127.0.0.1:{port}/info")
        result["state_after_restore"] = {p: api.state(p).name for p in pids}
        result["same_pids"] = all(
            a["pids"] == b["pids"] == pids for a, b in zip(before, after, strict=True)
        )
        result["outputs_identical"] = before == after
        result["ok"] = bool(result["outputs_identical"] and result["same_pids"])
    except Exception as exc:  # recorded, the other mode still runs
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        with contextlib.suppress(OSError):
            result["worker_log"] = worker_log.read_text()[-4000:]
        kill_tree(pids)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    log(f"{comm}: ok={result.get('ok')} {result.get('error', '')}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/var/tmp/multiproc-1gpu")
    parser.add_argument("--comms", default="tcp,gloo")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = DirectoryStore(work / f"store-{time.time_ns()}")
    criu_mod.become_subreaper()
    runs: list[dict] = []
    for comm in args.comms.split(","):
        runs.append(one_mode(comm, work, store))
        write(args.out, runs)  # after each mode: a run cut short still leaves its results
    return 0 if all(r["ok"] for r in runs) else 1


def write(out: str, runs: list[dict]) -> None:
    import torch

    doc = {
        "what": "two CUDA processes (TP-2 MLP shards, both on GPU 0) checkpointed as one tree "
                "and restored; lock all -> checkpoint each -> one CRIU dump; CRIU restore -> "
                "CUDA restore of each with GPU pairs -> unlock all",
        "command": " ".join(sys.argv),
        "criu": criu_mod.criu_version(),
        "torch": torch.__version__,
        "driver": get_api().driver_version,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1, default=str))
    log(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
