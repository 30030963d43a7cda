"""Restore benchmark: cold start vs checkpoint/restore of the GPU reference worker.

For each model (Qwen3-shaped 0.6B and 8B, random bf16 weights in a safetensors file):
  cold      exec of the worker to its first correct HTTP response, page caches dropped
            (it reads the weights file, builds the model, warms up, captures CUDA graphs)
  memory    fast-path artifact (no weights, no KV cache in the CRIU image), staged in the page
            cache together with the weights file: CRIU restore + CUDA restore + parallel pinned
            weight reload + KV re-allocation, to the first correct response
  disk      the same artifact and weights file after dropping the page caches: the agent's
            verification reads the images (parallel, into the page cache) while CRIU restores
            behind it; then the preloader reads the weights (disk_bytes_read: every byte read
            from the disk meanwhile, the worker's libraries included, as drop_caches evicts them)
  disk_artifact  the same, but only the artifact and weights files are evicted: the worker's
            libraries stay cached, as on a node that already runs this image
The memory and disk paths include the agent's verification of the artifact (sha256 of every
file against its manifest, as the agent does on every read), run as the agent runs it:
alongside CRIU, the tree restored stopped until every file matched (`--no-verify` leaves it
out). The weights file is handled by the agent's own functions (autoscaler/agent/external.py):
recorded in the manifest at checkpoint time (the worker declares it in its handshake offer;
hashed while CUDA and CRIU work), warmed and verified when staged to memory (the node then
remembers the verification), checked alongside CRIU before the tree runs (one stat when the
node verified it unchanged), and the preloader asked to load it by `Preloads`, as the agent's
restore does.
  baseline  the upstream path: the weights inside the CRIU image (only the KV cache released),
            restored from the page cache
Every response is compared token for token (and logit for logit) with the cold worker's.

Writes {"runs": [...], ...} to --out; see docs/restore-benchmark.md.
Needs root (CRIU, drop_caches), a GPU with the driver's checkpoint API, python3 with torch,
and CRIU >= 4.2 (scripts/install-criu.sh; carried as .cache/criu-root to the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from autoscaler.agent import checkpoint as checkpoint_mod  # noqa: E402
from autoscaler.agent import criu as criu_mod  # noqa: E402
from autoscaler.agent import external, fastload, kdat, pagefill  # noqa: E402
from autoscaler.agent import preloaders as preloaders_mod  # noqa: E402
from autoscaler.agent import restore as restore_mod  # noqa: E402
from autoscaler.agent import staging as staging_mod  # noqa: E402
from autoscaler.agent import store as store_mod  # noqa: E402
from autoscaler.agent.hooks import Handshake  # noqa: E402

GiB = 1 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- machine -------------------------------------------------------------------------------
def sh(cmd: str, timeout: float = 60) -> str:
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"(timed out: {cmd})"
    return (p.stdout + p.stderr).strip()


class Caches:
    """Drops the page cache: globally when the kernel lets us, else file by file."""

    def __init__(self, allow_global: bool) -> None:
        self.method = "none"
        if allow_global:
            try:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                self.method = "drop_caches"
            except OSError as exc:
                log(f"drop_caches refused ({exc}); evicting files with posix_fadvise instead")
                self.method = "fadvise"
        else:
            self.method = "fadvise"

    def drop(self, files: list[Path], only_files: bool = False) -> None:
        os.sync()
        if self.method == "drop_caches" and not only_files:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        for f in files:  # also after drop_caches: cheap, and certain for our own files
            fastload.evict_from_page_cache(f)


def disk_read_bytes(path: Path) -> int | None:
    """Bytes read so far from the block device under path (/proc/diskstats), or None."""
    try:
        dev = os.stat(path).st_dev
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f[2] == name:
                return int(f[5]) * 512  # sectors read
    except (OSError, IndexError, ValueError):
        return None
    return None


def image_files(images: Path) -> list[Path]:
    """CRIU image files, small ones first (CRIU reads them before the pages)."""
    return sorted((p for p in images.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


#: the paths --paths chooses from; the comparison paths (memory_own_load, *_criu_fill, ...)
#: come from their own options
MAIN_PATHS = ("cold", "memory", "disk", "disk_artifact", "baseline")
PROBE_BYTES = 2 << 30


def bandwidth_probe(work: Path) -> Path:
    """A 2 GiB file of random bytes on the benchmark's disk, read before and after each disk
    restore: the disk's bandwidth moves by 15-20% within minutes on the GPU machine, so the
    bound of each restore is taken from the reads around it, not from one figure per model."""
    probe = work / "disk-probe.bin"
    if not probe.exists() or probe.stat().st_size != PROBE_BYTES:
        with open(probe, "wb") as f:
            for _ in range(PROBE_BYTES // (64 << 20)):
                f.write(os.urandom(64 << 20))
            f.flush()
            os.fsync(f.fileno())
    return probe


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_read_gbps(
    path: Path, caches: Caches, threads: int = 16, only_file: bool = False
) -> float:
    """Read bandwidth of the disk under `path` (caches dropped first: all of them, or only
    that file's)."""
    caches.drop([path], only_files=only_file)
    t = time.perf_counter()
    n = fastload.prefetch([path], threads=threads, chunk_bytes=16 << 20)
    return n / (time.perf_counter() - t) / 1e9


# --- worker control ------------------------------------------------------------------------
def http(url: str, method: str = "GET", timeout: float = 60) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def first_response(port: int, deadline_s: float, proc_alive, pid: int) -> dict[str, Any]:
    """Poll /generate until it answers 200 (connection refused = listener not open yet).

    The answer must come from `pid`: a stale worker on the port would fake a fast start.
    """
    url = f"http://127.0.0.1:{port}/generate"
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            code, body = http(url, timeout=120)
            if code == 200:
                if body.get("pid") != pid:
                    raise RuntimeError(f"port {port} answered by pid {body.get('pid')}, not {pid}")
                return body
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if not proc_alive():
            raise RuntimeError("worker died before answering")
        time.sleep(0.002)
    raise TimeoutError(f"no answer on port {port} within {deadline_s} s")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def start_preloader(
    sock: Path, log_file: Path, *extra: str, folder: Path | None = None
) -> subprocess.Popen:
    """A weight preloader (fastload preload) serving on sock, once it listens; with `folder`,
    the per-GPU preloader as the DaemonSet runs it (--socket-dir), `sock` being the socket it
    must create there for this GPU."""
    where = ["--socket-dir", str(folder)] if folder is not None else ["--socket", str(sock)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoscaler.agent.fastload", "preload", *where, *extra],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=open(log_file, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    end = time.time() + 120
    while not sock.exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    if not sock.exists():
        raise SystemExit(f"preloader did not start; see {log_file}")
    return proc


def point_socket(link: Path, sock: Path) -> None:
    """Make `link` (the path workers connect to) a symlink to `sock`, atomically."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(sock)
    tmp.replace(link)


@contextlib.contextmanager
def preloader_pinning_per_load(work: Path) -> Iterator[None]:
    """Within: preload.sock leads to the preloader started with --pinned-areas 0."""
    sock = work / "preload.sock"
    point_socket(sock, work / "preload-pinned-per-load.sock")
    try:
        yield
    finally:
        point_socket(sock, work / "preload-pinned-once.sock")


def kill_and_wait(pid: int, timeout: float = 60) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    end = time.time() + timeout
    while os.path.exists(f"/proc/{pid}") and time.time() < end:
        time.sleep(0.01)
    if os.path.exists(f"/proc/{pid}"):
        raise RuntimeError(f"pid {pid} still present {timeout} s after SIGKILL")


def memory_map(pid: int, top: int = 8) -> dict[str, Any]:
    """Resident memory of a process by kind, and its largest anonymous mappings (smaps):
    what a CRIU dump of it will have to write."""
    maps: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = {"range": head[0], "size": hi - lo, "name": " ".join(head[5:]) or "[anon]"}
                maps.append(cur)
            elif cur is not None and head[0] in ("Rss:", "Anonymous:"):
                cur[head[0][:-1].lower()] = int(head[1]) * 1024
    anon = sum(m.get("anonymous", 0) for m in maps)
    rss = sum(m.get("rss", 0) for m in maps)
    biggest = sorted(maps, key=lambda m: m.get("anonymous", 0), reverse=True)[:top]
    return {
        "rss": rss, "anonymous": anon, "mappings": len(maps),
        "largest_anonymous": [
            {"size": m["size"], "anonymous": m.get("anonymous", 0), "name": m["name"]}
            for m in biggest
        ],
    }  # fmt: skip


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("tokens") == b.get("tokens") and a.get("logits") == b.get("logits")


def faults_by_range(faults: list[tuple[int, int, int]]) -> dict[str, int]:
    """Faults served while the tree ran, counted by the size of the lazy range each hit (small
    ranges: heap and library data; the largest: the CUDA driver's host copy of the GPU;
    "zero": memory the dump lacks, zero-filled)."""
    bounds = ((1, "zero"), (64 << 10, "<64K"), (2 << 20, "<2M"), (64 << 20, "<64M"))
    out: dict[str, int] = {}
    for _pid, _page, n in faults:
        name = next((label for limit, label in bounds if n < limit), ">=64M")
        out[name] = out.get(name, 0) + 1
    return out


def fill_profile(fill: dict[str, Any], faults: list[tuple[int, int, int]]) -> str:
    """Where a fill beside a running tree spent its time, for the log."""
    threads = max(1, int(fill.get("threads", 1)))
    python = (float(fill.get("thread_s", 0)) - float(fill.get("copy_s", 0))) / threads
    return (f"tree ran from {float(fill.get('running_at_s', -1)):.3f} s into the fill; per "
            f"thread {float(fill.get('copy_s', 0)) / threads:.3f} s in UFFDIO_COPY, "
            f"{python:.3f} s outside it, {fill.get('stalls', 0)} stalls; events read "
            f"{fill.get('event_reads', 0)}x, gate waited {float(fill.get('gate_wait_s', 0)):.3f}"
            f" s; faults waited {float(fill.get('fault_wait_s', 0)):.3f} s in all, at most "
            f"{float(fill.get('fault_wait_max_s', 0)) * 1e3:.1f} ms; by range "
            f"{faults_by_range(faults)}; {fill.get('first_chunks', 0)} chunks first, "
            f"{fill.get('zeroed_first', 0)} pages zeroed first")


@dataclass
class ModelRun:
    model: str
    weights: Path
    work: Path
    port: int
    args: argparse.Namespace
    caches: Caches
    api: Any
    runs: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    pid: int | None = None
    proc: Any = None
    verify_roots: dict[Path, Path] = field(default_factory=dict)
    # per images directory: the external files the checkpoint recorded (the fast path's weights)
    externals: dict[Path, tuple[Any, ...]] = field(default_factory=dict)
    recorded_gpus: dict[Path, list[str]] = field(default_factory=dict)
    # per images directory: the pages restores of it faulted on while their tree ran, all of
    # them so far (dump-time pid, page address): its working set, as the agent keeps it per
    # artifact (NodeCache.working_set) and fills first (RestoreRequest.working_set)
    faults: dict[Path, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    @property
    def probe(self) -> Path:
        return bandwidth_probe(self.work.parent)

    @property
    def verified_files(self) -> external.VerifiedFiles:
        """The node's record of verified external files (the agent keeps it beside its cache)."""
        return external.VerifiedFiles(self.work / "external-verified.json")

    def seal_for_verify(self, images: Path) -> Path:
        """An agent-store view of a CRIU images directory: hard links of its files under
        `<images>.artifact/images` and a manifest (sha256 of every file and of each 64 MiB
        block, and the external files the checkpoint recorded), so a restore can be timed with
        the agent's own verification."""
        root = images.parent / f"{images.name}.artifact"
        shutil.rmtree(root, ignore_errors=True)
        (root / "images").mkdir(parents=True)
        for f in image_files(images):
            os.link(f, root / "images" / f.name)
        t = time.perf_counter()
        store_mod.seal_directory(
            root, root.name, store_mod.ArtifactInfo(
                workload=f"restore-bench-{self.model}",
                external_files=self.externals.get(images, ()),
            ),
        )  # fmt: skip
        log(f"{self.model}: sealed {images.name} for verification in "
            f"{time.perf_counter() - t:.2f} s")  # fmt: skip
        self.verify_roots[images] = root
        return root

    @property
    def preload_socket(self) -> Path:
        if self.args.preloader_per_gpu:  # the socket named by the GPU's UUID
            return self.work.parent / "preload.d" / preloaders_mod.socket_name(self.args.gpu_uuid)
        return self.work.parent / "preload.sock"

    @property
    def load(self) -> tuple[int, int]:
        """Loader threads and chunk MiB for this model (--load-config, else the defaults)."""
        for item in filter(None, self.args.load_config.split(",")):
            model, cfg = item.split("=")
            if model == self.model:
                threads, chunk = cfg.split("x")
                return int(threads), int(chunk)
        return self.args.load_threads, self.args.chunk_mib

    @property
    def criu_options(self) -> criu_mod.CriuOptions:
        return criu_mod.CriuOptions(
            verbosity=self.args.criu_verbosity, extra_args=tuple(shlex.split(self.args.criu_extra)),
            page_fill=self.args.page_fill, page_fill_threads=self.args.page_fill_threads,
        )  # fmt: skip

    @property
    def hs(self) -> Handshake:
        return Handshake(self.work / "handshake")

    def worker_cmd(self) -> list[str]:
        a = self.args
        return [
            sys.executable, "-m", "autoscaler.agent.gpu_worker", "serve",
            "--model", self.model, "--weights", str(self.weights), "--device", a.device,
            "--port", str(self.port), "--kv-gib", str(a.kv_gib),
            "--load-threads", str(self.load[0]), "--chunk-mib", str(self.load[1]),
            "--handshake-dir", str(self.work / "handshake"),
            "--log-file", str(self.work / "worker.log"),
            *(["--no-fixed-addresses"] if a.no_fixed_addresses else []),
            *((["--preload-socket-dir", str(self.preload_socket.parent)]
               if a.preloader_per_gpu else ["--preload-socket", str(self.preload_socket)])
              if a.preload else []),
            *shlex.split(a.worker_args),
        ]  # fmt: skip

    # cold start ---------------------------------------------------------------------------
    def cold_start(self) -> None:
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} is taken: a stale worker? (stop it first)")
        self.caches.drop([self.weights])
        resident = fastload.page_cache_fraction(self.weights)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.time()
        env["WORKER_T_EXEC"] = repr(t0)
        proc = subprocess.Popen(
            self.worker_cmd(), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.proc = proc
        self.pid = proc.pid
        body = first_response(self.port, self.args.timeout, lambda: proc.poll() is None, proc.pid)
        seconds = time.time() - t0
        _, health = http(f"http://127.0.0.1:{self.port}/health")
        again = first_response(self.port, 60, lambda: proc.poll() is None, proc.pid)
        self.reference = body
        ok = same_output(body, again) and bool(health.get("graph_matches_eager"))
        log(f"{self.model} cold: {seconds:.2f} s  tokens={body['tokens'][:8]}...  ok={ok}")
        self.runs.append({
            "model": self.model, "path": "cold", "seconds_to_first_response": round(seconds, 3),
            "artifact_bytes": 0, "output_matches": ok,
            "weights_bytes": self.weights.stat().st_size,
            "weights_resident_before": round(resident, 4),
            "phases": health.get("cold_phases"), "load": health.get("last_load"),
            "params": health.get("params"),
        })  # fmt: skip

    def stop_worker(self) -> None:
        """Kill the cold-started worker (its whole session) and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc = None
        self.pid = None

    # checkpoint ---------------------------------------------------------------------------
    def checkpoint(self, mode: str, images: Path) -> dict[str, Any]:
        assert self.pid is not None
        if images.exists():
            shutil.rmtree(images)
        logs = images.parent / f"{images.name}-logs"
        shutil.rmtree(logs, ignore_errors=True)
        hs = self.hs
        hs.clear()
        t0 = time.perf_counter()
        code, body = http(f"http://127.0.0.1:{self.port}/admin/checkpoint?mode={mode}", "POST")
        if code != 202:
            raise RuntimeError(f"checkpoint request refused: {code} {body}")
        offer = hs.wait_ready_for_checkpoint(timeout_s=120)
        t_release = time.perf_counter() - t0
        memory = {"released": memory_map(self.pid)}
        # the GPU the agent's checkpoint records (the worker's offer, else nvidia-smi), which
        # routes a restore without gpu_pairs to that GPU's preloader (--preloader-per-gpu)
        gpus = checkpoint_mod.source_gpus(offer, self.pid) if self.api is not None else {}
        self.recorded_gpus[images] = list(gpus.get("gpu_uuids", []))
        # As the agent does: the files the worker declared (fast path: its weights) are opened
        # now and hashed in the background while CUDA and CRIU work; the dump waits for them.
        with checkpoint_mod.record_external_files(offer, self.pid, log) as recording:
            t = time.perf_counter()
            if self.api is not None:
                self.api.checkpoint_process(self.pid)
            t_cuda = time.perf_counter() - t
            memory["cuda_checkpointed"] = memory_map(self.pid)
            dumped = criu_mod.dump(self.pid, images, logs, self.criu_options)
            t = time.perf_counter()
            self.externals[images] = recording.result() if recording else ()
            t_external_wait = time.perf_counter() - t
            t_external = recording.seconds if recording else 0.0
        if self.proc is not None and self.proc.pid == self.pid:
            self.proc.wait(timeout=60)
            self.proc = None
        kill_and_wait(self.pid)  # the dump ends it; make sure it is gone (and reaped)
        os.sync()
        total = time.perf_counter() - t0
        info = {
            "mode": mode, "checkpoint_seconds": round(total, 3),
            "release_s": round(t_release, 3), "cuda_checkpoint_s": round(t_cuda, 3),
            "criu_dump_s": round(dumped.seconds, 3), "artifact_bytes": dir_bytes(images),
            "criu_pids": len(dumped.pids), "process_memory": memory,
            # the external files recorded (hashed alongside CUDA and CRIU; the wait after the
            # dump is inside checkpoint_seconds)
            "external_files": [{"path": f.path, "bytes": f.size, "preload": f.preload}
                               for f in self.externals[images]],
            "external_hash_s": round(t_external, 3),
            "external_wait_after_dump_s": round(t_external_wait, 3),
            "recorded_gpus": gpus,
        }  # fmt: skip
        log(f"{self.model} checkpoint {mode}: {info}")
        self.details[f"checkpoint_{mode}"] = info
        return info

    # restore ------------------------------------------------------------------------------
    def restore(
        self, path: str, images: Path, ckpt: dict[str, Any], keep: bool = False,
        preload: bool | None = None, page_fill: str | None = None,
        load: tuple[int, int] | None = None, kdat_cache: bool = True, verify_threads: int = 0,
        preload_lead_s: float = 0.0, gpu_staged_s: float = 0.0,
        fill_while_running: bool | None = None, registered: bool = False,
        verify_digest: str = store_mod.DEFAULT_DIGEST, fill_threads: int = 0,
        fill_order: str = "", fill_chunk_kib: int = 0, working_set: bool | None = None,
    ) -> None:  # fmt: skip
        logs = images.parent / f"{images.name}-logs"
        options = self.criu_options
        if page_fill is not None:  # a comparison run: who copies the pages into place
            options = replace(options, page_fill=page_fill)
        if not kdat_cache:  # a comparison run: CRIU probes the kernel, as before the cache
            options = replace(options, kdat_cache=False)
            for made in (kdat.KDAT_FILE, kdat.STAMP_FILE):
                (Path("/") / made).unlink(missing_ok=True)
        from_disk = path.startswith("disk")
        # the agent's policy (RestoreRequest.fill_while_running), unless a comparison run asks
        running = (restore_mod.fills_while_running(self.args.fill_while_running,
                                                   "disk" if from_disk else "memory")
                   if fill_while_running is None else fill_while_running)  # fmt: skip
        options = replace(options, fill_while_running=running)
        if fill_threads:  # a comparison run: the parallel fill's threads
            options = replace(options, page_fill_threads=fill_threads)
        if fill_order:  # a comparison run: the order the fill hands its chunks out in
            options = replace(options, page_fill_order=fill_order)
        if fill_chunk_kib:  # a comparison run: the fill's bytes per UFFDIO_COPY
            options = replace(options, page_fill_chunk_bytes=fill_chunk_kib << 10)
        # the agent's working set (RestoreRequest.working_set): with the tree running during
        # the fill, what earlier restores of these images faulted on goes first, and this
        # restore's faults are added; a comparison run (working_set=False) does neither
        working_set = self.args.working_set if working_set is None else working_set
        working_set = working_set and running and options.parallel_fill()
        if working_set:
            options = replace(options, page_fill_first=self.faults.get(images, ()))
        # the agent's order from disk: the images first, then the weights (one stream at a
        # time); "_preload_at_once" runs (--compare-disk-preload) start both together
        preload_at_once = not from_disk or path.endswith("_preload_at_once")
        weights_needed = ckpt["mode"] == "fast"
        preload = self.args.preload if preload is None else preload
        preload = preload and weights_needed
        staged = [*image_files(images), *([self.weights] if weights_needed else [])]
        # the weights as the checkpoint recorded them (the worker declared them); empty for the
        # baseline, whose weights are inside the image
        files = self.externals.get(images, ()) if weights_needed else ()
        known = self.verified_files
        staging: dict[str, Any] = {}
        around: list[float] = []  # the disk's bandwidth just before and after this restore
        if from_disk:  # disk_artifact: only our files leave the cache (the worker's libraries
            # stay, as on a node that already runs this image); disk: everything is dropped
            around.append(measure_read_gbps(self.probe, self.caches, only_file=True))
            self.caches.drop(staged, only_files=path.startswith("disk_artifact"))
        else:  # memory / baseline: staged into the page cache ahead of demand (not timed)
            fastload.prefetch([f for f in staged if f != self.weights or not files], threads=16)
            if files:  # as the agent's memory staging: warm the weights, verify them once
                t = time.perf_counter()
                staging["external_files"] = external.warm_and_verify(
                    files, Path, known, threads=16
                )
                staging["external_warm_verify_s"] = round(time.perf_counter() - t, 3)
        resident = {
            "images": round(fastload.page_cache_fraction(max(staged[:-1] or staged,
                                                            key=lambda p: p.stat().st_size)), 4),
            "weights": round(fastload.page_cache_fraction(self.weights), 4),
        }  # fmt: skip
        hs = self.hs
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} is taken before the restore")
        hs.prepare_restore()
        verify_root = self.verify_roots.get(images) if self.args.verify else None
        threads, chunk = load or self.load  # the preload's reader threads x chunk MiB
        # the agent's preload requests (the preloader loads the weights while CRIU and CUDA
        # run; a failed restore releases them), with this model's chunk size and the agent's
        # choice of reader threads (Preloads.threads_for: from memory, and from disk for a
        # large file; from disk for a small one, this model's loader threads), unless this run
        # asks for a loader config of its own (disk_loadTxC, memory_loadTxC)
        preloads = restore_mod.Preloads(
            str(self.preload_socket) if preload else None, Path,
            threads if load or from_disk else None, chunk << 20,
            disk_threads=None if load else restore_mod.DISK_PRELOAD_THREADS,
        )  # fmt: skip
        if preload and self.args.preloader_per_gpu:  # the agent's routing (--preload-socket-dir):
            # no gpu_pairs, so the GPU the checkpoint recorded
            recorded = self.recorded_gpus.get(images, [])
            if not recorded:
                raise RuntimeError("the checkpoint recorded no GPU: nothing to route by")
            preloads.route(preloaders_mod.choose(
                None, str(self.preload_socket.parent), preloaders_mod.target_gpus((), recorded),
            ), from_dir=True)  # fmt: skip
            if preloads.socket_path != str(self.preload_socket):
                raise RuntimeError(f"routed to {preloads.socket_path}: {preloads.warnings}")
        verified = None
        if verify_root is not None:  # the cheap half of the agent's open (manifest, sizes)
            manifest = store_mod.verify_directory(
                verify_root.name, verify_root, check_contents=False
            )
            verified = store_mod.VerifiedArtifact(manifest, verify_root, contents_checked=False)
        log_name = f"restore-{path}-{time.time():.0f}.log"
        timings: dict[str, float] = {}
        checked: list[Any] = []
        read_before = disk_read_bytes(images)
        if preload_lead_s:  # a bound, not a path: the weights are on the GPU before t0, so the
            # restore runs without the preload's reads beside it (Preloads.start is once only)
            preloads.start(files, from_disk=from_disk)
            time.sleep(preload_lead_s)
        if gpu_staged_s:  # the agent's stage with weights_on_gpu, `gpu_staged_s` ahead: the
            # restore's own preload request below then finds them held (fastload.can_keep)
            on_gpu = staging_mod.stage_weights_on_gpu(files, str(self.preload_socket))
            if on_gpu["warnings"] or not on_gpu["requested"]:
                raise RuntimeError(f"weights not staged on the GPU: {on_gpu}")
            time.sleep(gpu_staged_s)
        if registered:  # the agent's stage with pin_weights: the preloader page-locks the
            # staged file where it lies, and the restore's load is then one DMA from it
            pinned = staging_mod.pin_weights(files, [str(self.preload_socket)])
            if pinned["warnings"] or not pinned["pinned"]:
                raise RuntimeError(f"weights not pinned: {pinned}")
            staging["registered"] = pinned["pinned"]
        t0 = time.perf_counter()
        # From memory the weights and the images are both in the page cache: start at once.
        # From disk the images come first (CRIU needs them now, the worker needs the weights
        # only after the CUDA restore): one reader at a time gets the disk's full bandwidth.
        # The agent's restore (restore_artifact) orders them the same way.
        if preload_at_once:
            preloads.start(files, from_disk=from_disk)
        if verified is not None:  # as the agent does: hash alongside CRIU, tree stopped, then
            # the weights checked (one stat when this node verified them unchanged)
            check = restore_mod.artifact_check(
                verify_root.name, verified, files, Path, known, timings, checked,  # type: ignore[union-attr]
                after_images=None if preload_at_once else (
                    lambda: preloads.start(files, from_disk=from_disk)),
                threads=verify_threads, digest=verify_digest,
            )  # fmt: skip
            restored = restore_mod.restore_while_verifying(
                images, logs, options, None, check, log_name
            )
        else:
            if from_disk:
                fastload.prefetch(image_files(images), threads=16)
                if not preload_at_once:
                    preloads.start(files, from_disk=True)
            restored = criu_mod.restore(images, logs, options, log_name=log_name)
        if from_disk and not preload and weights_needed:  # the worker reads them itself
            threading.Thread(
                target=fastload.prefetch, args=([self.weights],),
                kwargs={"threads": threads}, daemon=True,
            ).start()  # fmt: skip
        t_criu = time.perf_counter() - t0
        t_verify = timings.get("verify_contents", 0.0)
        pid = restored.host_pid
        try:  # with fill_while_running the fill goes on beside the CUDA restore and the worker
            if self.api is not None:
                self.api.restore_process(pid)
            t_cuda = time.perf_counter() - t0
            hs.signal_restored(**preloads.answer())  # the per-GPU socket's name and the ticket
            body = first_response(self.port, self.args.timeout, lambda: pid_alive(pid), pid)
            seconds = time.perf_counter() - t0
            # the restore is not done before its fill is (the agent waits for it too): any
            # wait past the first response is added
            fill = restored.fill.finish() if restored.fill else restored.page_fill
            fill_wait = max(0.0, time.perf_counter() - t0 - seconds) if restored.fill else 0.0
            seconds += fill_wait
            faulted = restored.fill.faults if restored.fill else []
            if working_set:  # as the agent records it: a union, its oldest pages kept first
                merged = dict.fromkeys((*self.faults.get(images, ()),
                                        *((p_, page) for p_, page, _n in faulted)))  # fmt: skip
                self.faults[images] = tuple(merged)[:staging_mod.MAX_WORKING_SET_PAGES]
        except BaseException as exc:
            # the worker must be dead before its fill's server lets go of its memory (it would
            # read zeros), and a fill that failed is the reason to give
            criu_mod.kill_restored(pid)
            failure = restored.fill.failure() if restored.fill is not None else None
            if failure is not None:
                raise failure from exc
            raise
        finally:
            if restored.fill is not None:
                restored.fill.close()
            if registered:  # the next restores load as before
                staging_mod.unpin_weights(files, [str(self.preload_socket)])
        read_after = disk_read_bytes(images)
        _, health = http(f"http://127.0.0.1:{self.port}/health")
        if "--fork-after-restore" in self.args.worker_args:  # what its child read
            deadline = time.monotonic() + 30
            while (health.get("fork_after_restore") or {}).get("state") == "running" and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
                _, health = http(f"http://127.0.0.1:{self.port}/health")
        ok = self.reference is not None and same_output(body, self.reference)
        filled = (f", page fill {fill['bytes'] / 1e9:.2f} GB in {fill['fill_s']:.3f} s x"
                  f"{fill['threads']}" if fill else ", CRIU's page fill")  # fmt: skip
        if fill and fill.get("while_running"):
            filled += (f" while running ({fill['faults_while_running']} faults, "
                       f"{fill_wait:.3f} s waited after the first response; "
                       f"{fill_profile(fill, faulted)})")  # fmt: skip
        if fill and fill.get("forks"):
            filled += f", {fill['forks']} forked child(ren) filled too"
        if fork := health.get("fork_after_restore"):
            filled += f", the child forked after the restore read its memory intact: " \
                      f"{fork.get('matches')}"
        log(f"{self.model} restore {path}: {seconds:.3f} s (criu {t_criu:.3f} incl. verify "
            f"{t_verify:.3f} alongside{filled}, cuda "
            f"{t_cuda - t_criu:.3f}) ok={ok} worker={health.get('restore_phases')}")  # fmt: skip
        self.runs.append({
            "model": self.model, "path": path, "seconds_to_first_response": round(seconds, 3),
            "artifact_bytes": ckpt["artifact_bytes"], "output_matches": ok,
            "checkpoint_seconds": ckpt["checkpoint_seconds"],
            "weights_bytes": self.weights.stat().st_size if weights_needed else 0,
            "weights_source": health.get("weights_source") if weights_needed else "image",
            "resident_before": resident,
            # every read of the disk meanwhile, the worker's libraries included
            "disk_bytes_read": (read_after - read_before
                                if read_before is not None and read_after is not None
                                else None),
            "verified": verify_root is not None,
            # the weights: how the restore checked them ("record": one stat; "hashed") and
            # what staging did beforehand (memory paths), and what the preloader was asked
            "external_check": [c.to_dict() for c in checked],
            "staging": staging,
            "preloaded": preloads.requested, "preload_warnings": preloads.warnings,
            # the parallel page fill (None: CRIU copied the pages itself)
            "page_fill": fill,
            "fill_while_running": options.fill_while_running,
            "fill_wait_after_response_s": round(fill_wait, 4),
            # the faults served while the tree ran, by the size of the lazy range they hit
            "faults_by_range": faults_by_range(faulted),
            "working_set_pages_used": len(options.page_fill_first) if working_set else None,
            # CRIU's kernel-feature cache (autoscaler.agent.kdat): "written", "cached", "off"...
            "criu_kdat": restored.kdat,
            "verify_threads": verify_threads or store_mod.default_threads(),
            "verify_digest": verify_digest if verify_root is not None else None,
            "phases": {"verify_s": round(t_verify, 3),  # alongside CRIU (overlapped)
                       "external_check_s": round(timings.get("external_check", 0.0), 4),
                       "criu_restore_s": round(t_criu, 3),
                       "cuda_restore_s": round(t_cuda - t_criu, 3),
                       "worker_s": round(seconds - t_cuda, 3),
                       "worker": health.get("restore_phases"),
                       "graphs_recaptured": health.get("graphs_recaptured"),
                       "load": health.get("last_load") if weights_needed else None,
                       "gpu_at_checkpoint": health.get("gpu_at_checkpoint"),
                       "limits_set_back": health.get("limits_set_back"),
                       "hugepage_advised_bytes": health.get("hugepage_advised_bytes"),
                       "fork_after_restore": health.get("fork_after_restore")},
        })  # fmt: skip
        self.pid = pid
        if not keep:
            kill_and_wait(pid)
            self.pid = None
        if around:
            around.append(measure_read_gbps(self.probe, self.caches, only_file=True))
            run = self.runs[-1]
            gbps = sum(around) / len(around)
            run["disk_read_GBps_around"] = [round(g, 3) for g in around]
            if run["disk_bytes_read"]:
                run["bound_s"] = round(run["disk_bytes_read"] / 1e9 / gbps, 3)
                run["over_bound_s"] = round(run["seconds_to_first_response"] - run["bound_s"], 3)


def preflight(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"),
        "kernel": sh("uname -r"),
        "python": sys.version.split()[0],
        "torch": sh(f"{sys.executable} -c 'import torch; print(torch.__version__)'"),
        "cpus": os.cpu_count(),
        "mem": sh("grep -E 'MemTotal|MemAvailable' /proc/meminfo | tr -s ' ' | tr '\\n' ' '"),
        "work_fs": sh(f"stat -f -c %T {work}; df -h {work} | tail -1"),
        "shm": sh("df -h /dev/shm | tail -1"),
    }
    try:
        criu = criu_mod.find_criu()
        info["criu"] = criu_mod.criu_version(criu)
        info["criu_check"] = sh(f"{criu} check 2>&1 | tail -1")
    except Exception as exc:
        info["criu"] = f"unavailable: {exc}"
    return info


def fill_variants(run: ModelRun, path: str, images: Path, ckpt: dict[str, Any],
                  args: argparse.Namespace, registered: bool = False) -> None:  # fmt: skip
    """After a `path` restore, the same one with each page-fill setting asked to compare."""
    if args.compare_fill_order:
        run.restore(f"{path}_order_{args.compare_fill_order}", images, ckpt,
                    registered=registered, fill_order=args.compare_fill_order)  # fmt: skip
    if args.compare_fill_chunk_kib:
        run.restore(f"{path}_chunk{args.compare_fill_chunk_kib}", images, ckpt,
                    registered=registered, fill_chunk_kib=args.compare_fill_chunk_kib)  # fmt: skip
    if args.compare_working_set:
        run.restore(f"{path}_no_working_set", images, ckpt, registered=registered,
                    working_set=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--work", default="/var/tmp/restore-bench", help="on a real disk")
    p.add_argument("--models", default="0.6b,8b")
    p.add_argument("--paths", default=",".join(MAIN_PATHS))
    p.add_argument("--memory-repeats", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--kv-gib", type=float, default=16.0)
    p.add_argument("--load-threads", type=int, default=16)
    p.add_argument("--chunk-mib", type=int, default=8)
    p.add_argument(
        "--load-config", default="0.6b=8x8,8b=16x8",
        help="per model THREADSxCHUNK_MIB for the weight loader (the worker's own loads, and "
        "the preload from disk of a file the agent gives no threads of its own), e.g. "
        "0.6b=8x8,8b=16x8; from memory the preload takes the agent's choice "
        "(restore.MEMORY_PRELOAD_THREADS)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--no-global-drop", action="store_true", help="evict only our files")
    p.add_argument("--keep", action="store_true", help="keep artifacts and weights")
    p.add_argument("--logs-out", default=None, help="copy worker and CRIU logs here")
    p.add_argument("--criu-verbosity", type=int, default=2)
    p.add_argument("--no-fixed-addresses", action="store_true", help="worker option (see there)")
    p.add_argument(
        "--preload", action="store_true",
        help="run a weight preloader (fastload preload) that loads the weights concurrently "
        "with the CRIU restore and hands them to the restored worker",
    )  # fmt: skip
    p.add_argument(
        "--preloader-per-gpu", action="store_true",
        help="with --preload: run it as deployed (preload --socket-dir: one socket per GPU, "
        "named by its UUID); restores route by the GPU's UUID as the agent's "
        "--preload-socket-dir does, and the worker takes its weights from the socket and with "
        "the ticket named in restore-complete (--preload-socket-dir)",
    )  # fmt: skip
    p.add_argument(
        "--worker-args", default="--checkpoint-limits stack=0",
        help="extra gpu_worker serve options (the fast path's release options; see there)",
    )  # fmt: skip
    p.add_argument("--label", default="", help="a name for this configuration, kept in the JSON")
    p.add_argument(
        "--thp-experiment", action="store_true",
        help="one more memory restore with transparent huge pages 'always' (path memory_thp)",
    )  # fmt: skip
    p.add_argument(
        "--criu-extra", default="",
        help="more CRIU options for dump and restore, e.g. '--file-validation filesize'",
    )  # fmt: skip
    p.add_argument(
        "--page-fill", default="auto", choices=criu_mod.PAGE_FILL_MODES,
        help="who copies a restore's memory pages into place (the agent's CriuOptions.page_fill)",
    )  # fmt: skip
    p.add_argument("--page-fill-threads", type=int, default=pagefill.DEFAULT_THREADS)
    p.add_argument(
        "--fill-while-running", default="memory", choices=restore_mod.FILL_WHILE_RUNNING,
        help="which restores continue the tree once CRIU is done and fill its pages beside "
        "the CUDA restore and the worker (the agent's --fill-while-running; default memory)",
    )  # fmt: skip
    p.add_argument(
        "--compare-fill-while-running", action="store_true",
        help="after each memory restore (and each memory_gpu_staged one), and in each disk "
        "round, one more with the other fill setting (paths *_fill_running or *_fill_first)",
    )  # fmt: skip
    p.add_argument(
        "--compare-page-fill", action="store_true",
        help="also restore from memory (x --memory-repeats) and from disk with CRIU's own "
        "single-threaded page fill (paths memory_criu_fill, disk_criu_fill)",
    )  # fmt: skip
    p.add_argument(
        "--compare-disk-preload", action="store_true",
        help="also restore from disk with the weights' preload started at once, beside the "
        "images, instead of after them (paths disk_preload_at_once, "
        "disk_artifact_preload_at_once)",
    )  # fmt: skip
    p.add_argument(
        "--compare-kdat", action="store_true",
        help="after each memory restore, one more without CRIU's kernel-feature cache (the "
        "file removed, kdat_cache off: CRIU probes the kernel; path memory_no_kdat)",
    )  # fmt: skip
    p.add_argument(
        "--compare-pinned-areas", action="store_true",
        help="with --preload: after each memory restore and in each disk round, one more "
        "whose preloader pins its readers' areas per load instead of once at start (paths "
        "memory_pinned_per_load, disk_pinned_per_load)",
    )  # fmt: skip
    p.add_argument(
        "--compare-fill-threads", type=int, default=0, metavar="N",
        help="after each memory (and memory_registered) restore, the same one whose page fill "
        "uses N threads instead of --page-fill-threads (paths memory_fillN, "
        "memory_registered_fillN)",
    )  # fmt: skip
    p.add_argument(
        "--compare-fill-order", default="", choices=("", *pagefill.FILL_ORDERS),
        help="after each memory (and memory_registered) restore, the same one whose page fill "
        "hands its chunks out in this order (paths memory_order_ORDER, "
        "memory_registered_order_ORDER)",
    )  # fmt: skip
    p.add_argument(
        "--compare-fill-chunk-kib", type=int, default=0, metavar="KIB",
        help="after each memory (and memory_registered) restore, the same one whose page fill "
        "copies KIB at a time (paths memory_chunkKIB, memory_registered_chunkKIB)",
    )  # fmt: skip
    p.add_argument(
        "--no-working-set", dest="working_set", action="store_false",
        help="the agent's --no-working-set: restores whose tree runs during the fill do not "
        "fill first the pages earlier restores of the same images faulted on",
    )  # fmt: skip
    p.add_argument(
        "--compare-working-set", action="store_true",
        help="after each memory (and memory_registered) restore, the same one without the "
        "working set (paths memory_no_working_set, memory_registered_no_working_set)",
    )  # fmt: skip
    p.add_argument(
        "--compare-verify-digest", action="store_true",
        help="after each memory (and memory_registered) restore, the same one with the "
        "artifact checked against its sha256 block digests instead of BLAKE3 (paths "
        "memory_sha256, memory_registered_sha256)",
    )  # fmt: skip
    p.add_argument(
        "--compare-verify-threads", type=int, default=0, metavar="N",
        help="after each memory restore, one more whose artifact is hashed by N threads "
        "instead of the default (path memory_verifyN)",
    )  # fmt: skip
    p.add_argument(
        "--compare-preload-lead", type=float, default=0.0, metavar="S",
        help="with --preload: after each memory restore, one more whose weights' preload was "
        "asked S seconds before the restore starts (path memory_preload_done: the restore "
        "without the preload's reads beside it, a bound for weights staged on the GPU side)",
    )  # fmt: skip
    p.add_argument(
        "--compare-gpu-staged", type=float, default=0.0, metavar="S",
        help="with --preload: after each memory restore, one more whose weights the agent's "
        "staging put on the GPU S seconds before (stage weights_on_gpu; path "
        "memory_gpu_staged)",
    )  # fmt: skip
    p.add_argument(
        "--compare-registered", action="store_true",
        help="with --preload: after each memory restore, one more whose staged weights file the "
        "preloader page-locked where it lies beforehand (stage pin_weights; path "
        "memory_registered: the load is one DMA from the page cache, no reader threads)",
    )  # fmt: skip
    p.add_argument(
        "--cold-repeats", type=int, default=1,
        help="cold starts per model; ratios are against their median (a cold start reads the "
        "weights from disk, whose bandwidth moves between calls)",
    )  # fmt: skip
    p.add_argument("--disk-repeats", type=int, default=1, help="rounds of the disk paths")
    p.add_argument(
        "--compare-load-configs", default="",
        help="also restore from disk with the weights' preload at these THREADSxCHUNK_MIB "
        "(paths disk_loadTxC), in every disk round, e.g. 16x16,32x8",
    )  # fmt: skip
    p.add_argument(
        "--compare-memory-load-configs", default="",
        help="after each memory restore, one more per THREADSxCHUNK_MIB given for the weights' "
        "preload (paths memory_loadTxC), e.g. 8x8,12x8",
    )  # fmt: skip
    p.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="leave the agent's artifact verification out of the memory and disk restores",
    )  # fmt: skip
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "runs": [],
        "models": {},
        "started": time.strftime("%FT%TZ", time.gmtime()),
        "label": args.label,
        "worker_args": args.worker_args,
    }
    result["machine"] = preflight(args, work)
    log(f"machine: {json.dumps(result['machine'])}")
    caches = Caches(allow_global=not args.no_global_drop)
    result["cache_drop_method"] = caches.method
    api = None
    if args.device == "cuda":
        from autoscaler.agent.cuda import get_api

        api = get_api()
        result["machine"]["cuda_driver"] = api.driver_version
    paths = args.paths.split(",")

    def other_fill(source: str) -> tuple[bool, str]:
        """The fill setting the policy does not pick for `source`, and its paths' suffix."""
        other = not restore_mod.fills_while_running(args.fill_while_running, source)
        return other, "_fill_running" if other else "_fill_first"
    preloaders: list[subprocess.Popen] = []
    if args.preload and args.preloader_per_gpu:
        if args.compare_pinned_areas or api is None:
            raise SystemExit("--preloader-per-gpu needs --device cuda and no "
                             "--compare-pinned-areas")  # fmt: skip
        args.gpu_uuid = api.devices()[0].uuid
        folder = work / "preload.d"
        sock = folder / preloaders_mod.socket_name(args.gpu_uuid)
        sock.unlink(missing_ok=True)
        preloaders.append(start_preloader(sock, work / "preloader.log", folder=folder))
        result["preloader"] = {"socket_dir": str(folder), "socket": str(sock),
                               "sockets": sorted(p.name for p in folder.iterdir())}  # fmt: skip
    elif args.preload:
        sock = work / "preload.sock"  # what the workers and the agent's requests connect to
        sock.unlink(missing_ok=True)
        preloaders.append(start_preloader(sock, work / "preloader.log"))
        result["preloader"] = {"socket": str(sock)}
        if args.compare_pinned_areas:  # a second one, pinning per load as before; the
            # comparison restores point preload.sock at it (a symlink, swapped between runs)
            sock.rename(work / "preload-pinned-once.sock")
            fresh = work / "preload-pinned-per-load.sock"
            fresh.unlink(missing_ok=True)
            preloaders.append(start_preloader(fresh, work / "preloader-per-load.log",
                                              "--pinned-areas", "0"))  # fmt: skip
            point_socket(sock, work / "preload-pinned-once.sock")

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)

    for model in args.models.split(","):
        mwork = work / model
        mwork.mkdir(parents=True, exist_ok=True)
        weights = work / f"qwen3-{model}.safetensors"
        if not weights.exists():
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "autoscaler.agent.gpu_worker", "make-weights",
                 "--model", model, "--out", str(weights), "--device", args.device],
                cwd=REPO, check=True,
            )  # fmt: skip
            took = time.perf_counter() - t
            log(f"{model}: wrote {weights.stat().st_size / 1e9:.2f} GB in {took:.1f} s")
        run = ModelRun(model, weights, mwork, args.port, args, caches, api)
        mres: dict[str, Any] = {}
        result["models"][model] = mres
        try:
            mres["disk_read_GBps"] = round(measure_read_gbps(weights, caches), 2)
            log(f"{model}: disk read {mres['disk_read_GBps']} GB/s")
            for _ in range(args.cold_repeats - 1):  # the last one's worker is checkpointed
                run.cold_start()
                run.stop_worker()
            run.cold_start()
            fast_images = mwork / "fast"
            ckpt = run.checkpoint("fast", fast_images)
            if args.verify:
                run.seal_for_verify(fast_images)
            if "memory" in paths:
                if args.working_set:  # the artifact's first restore on a node: no working set
                    # yet (it records one), as the agent's first restore of a staged copy
                    run.restore("memory_first_on_node", fast_images, ckpt)
                for _ in range(args.memory_repeats):
                    run.restore("memory", fast_images, ckpt)
                    if args.compare_kdat:  # interleaved: the VM's drift hits both alike
                        run.restore("memory_no_kdat", fast_images, ckpt, kdat_cache=False)
                    if args.compare_verify_threads:
                        n = args.compare_verify_threads
                        run.restore(f"memory_verify{n}", fast_images, ckpt, verify_threads=n)
                    for cfg in filter(None, args.compare_memory_load_configs.split(",")):
                        t, c = (int(x) for x in cfg.split("x"))  # the preload at cfg
                        run.restore(f"memory_load{cfg}", fast_images, ckpt, load=(t, c))
                    if args.compare_preload_lead and args.preload:
                        run.restore("memory_preload_done", fast_images, ckpt,
                                    preload_lead_s=args.compare_preload_lead)  # fmt: skip
                    if args.compare_fill_while_running:
                        other, name = other_fill("memory")
                        run.restore(f"memory{name}", fast_images, ckpt,
                                    fill_while_running=other)  # fmt: skip
                    if args.compare_gpu_staged and args.preload:
                        run.restore("memory_gpu_staged", fast_images, ckpt,
                                    gpu_staged_s=args.compare_gpu_staged)  # fmt: skip
                        if args.compare_fill_while_running:
                            other, name = other_fill("memory")
                            run.restore(f"memory_gpu_staged{name}", fast_images, ckpt,
                                        gpu_staged_s=args.compare_gpu_staged,
                                        fill_while_running=other)  # fmt: skip
                    if args.compare_fill_threads:  # the same restore, another fill width
                        n = args.compare_fill_threads
                        run.restore(f"memory_fill{n}", fast_images, ckpt, fill_threads=n)
                    if args.compare_verify_digest:  # the same restore checked by sha256
                        run.restore("memory_sha256", fast_images, ckpt, verify_digest="sha256")
                    fill_variants(run, "memory", fast_images, ckpt, args)
                    if args.compare_registered and args.preload:
                        run.restore("memory_registered", fast_images, ckpt, registered=True)
                        if args.compare_fill_while_running:
                            other, name = other_fill("memory")
                            run.restore(f"memory_registered{name}", fast_images, ckpt,
                                        registered=True, fill_while_running=other)  # fmt: skip
                        if args.compare_fill_threads:
                            n = args.compare_fill_threads
                            run.restore(f"memory_registered_fill{n}", fast_images, ckpt,
                                        registered=True, fill_threads=n)  # fmt: skip
                        if args.compare_verify_digest:
                            run.restore("memory_registered_sha256", fast_images, ckpt,
                                        registered=True, verify_digest="sha256")  # fmt: skip
                        fill_variants(run, "memory_registered", fast_images, ckpt, args,
                                      registered=True)  # fmt: skip
                    if args.compare_pinned_areas and args.preload:
                        with preloader_pinning_per_load(work):
                            run.restore("memory_pinned_per_load", fast_images, ckpt)
            if args.compare_page_fill and "memory" in paths:
                for _ in range(args.memory_repeats):
                    run.restore("memory_criu_fill", fast_images, ckpt, page_fill="criu")
            if args.thp_experiment:
                with transparent_hugepages("always") as before:
                    mres["thp_setting_before"] = before
                    run.restore("memory_thp", fast_images, ckpt)
            for _ in range(args.disk_repeats):
                if "disk" in paths:
                    run.restore("disk", fast_images, ckpt)
                if "disk_artifact" in paths:
                    run.restore("disk_artifact", fast_images, ckpt)
                if args.compare_fill_while_running and "disk" in paths:
                    other, name = other_fill("disk")
                    run.restore(f"disk{name}", fast_images, ckpt, fill_while_running=other)
                if args.compare_pinned_areas and args.preload and "disk" in paths:
                    with preloader_pinning_per_load(work):
                        run.restore("disk_pinned_per_load", fast_images, ckpt)
                for cfg in filter(None, args.compare_load_configs.split(",")):
                    if "disk" in paths:  # the same disk restore, the weights' preload at cfg
                        t, c = (int(x) for x in cfg.split("x"))
                        run.restore(f"disk_load{cfg}", fast_images, ckpt, load=(t, c))
            if args.compare_page_fill and "disk" in paths:
                run.restore("disk_criu_fill", fast_images, ckpt, page_fill="criu")
            if args.compare_disk_preload:
                for base in ("disk", "disk_artifact"):
                    if base in paths:
                        run.restore(f"{base}_preload_at_once", fast_images, ckpt)
            # The baseline artifact is taken from a restored worker that loaded its weights
            # itself (a preloader's imported allocation is shared memory, which the CUDA
            # checkpoint is not asked to handle). With a preloader this restore doubles as the
            # comparison "memory_own_load".
            if "baseline" in paths or args.preload:
                run.restore("memory_own_load", fast_images, ckpt, keep="baseline" in paths,
                            preload=False)  # fmt: skip
                if not args.preload:
                    run.runs.pop()
            if "baseline" in paths:
                base_images = mwork / "baseline"
                bckpt = run.checkpoint("baseline", base_images)
                run.restore("baseline", base_images, bckpt)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            mres["error"] = f"{type(exc).__name__}: {exc}"
            if run.pid is not None and os.path.exists(f"/proc/{run.pid}"):
                with contextlib.suppress(Exception):
                    kill_and_wait(run.pid)
        finally:
            mres.update(run.details)
            # a main path only when asked for, but the cold starts always (every ratio is
            # against them); every comparison path ran because its option asked for it
            result["runs"].extend(
                r for r in run.runs
                if r["path"] in (*paths, "cold") or r["path"] not in MAIN_PATHS
            )
            save()
            if args.logs_out:
                keep_logs(mwork, Path(args.logs_out) / model)
            if not args.keep:
                shutil.rmtree(mwork, ignore_errors=True)
    for preloader in preloaders:
        preloader.kill()
        preloader.wait()
    result["finished"] = time.strftime("%FT%TZ", time.gmtime())
    save()
    print_table(result)
    return 0 if all("error" not in m for m in result["models"].values()) else 1


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@contextlib.contextmanager
def transparent_hugepages(mode: str):
    """Set the THP mode for the duration (a node setting; the experiment says so)."""
    text = THP.read_text()
    before = text[text.index("[") + 1 : text.index("]")]
    THP.write_text(mode)
    try:
        yield before
    finally:
        THP.write_text(before)


def keep_logs(mwork: Path, dest: Path) -> None:
    """Worker log and CRIU logs of a model's runs (the artifacts themselves are deleted)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in mwork.glob("*.log"):
        shutil.copy2(p, dest / p.name)
    for d in mwork.glob("*-logs"):
        shutil.copytree(d, dest / d.name, dirs_exist_ok=True)


def print_table(result: dict[str, Any]) -> None:
    colds: dict[str, list[float]] = {}
    for r in result["runs"]:
        if r["path"] == "cold":
            colds.setdefault(r["model"], []).append(r["seconds_to_first_response"])
    cold = {model: statistics.median(s) for model, s in colds.items()}  # ratios: vs the median
    print(f"{'model':6} {'path':16} {'seconds':>8} {'vs cold':>8} {'artifact GB':>11} match"
          "  bound (bytes / bandwidth around it)")  # fmt: skip
    for r in result["runs"]:
        c = cold.get(r["model"])
        ratio = f"{c / r['seconds_to_first_response']:.1f}x" if c and r["path"] != "cold" else ""
        bound = (f"  {r['bound_s']:.2f} s ({r['over_bound_s']:+.2f})" if "bound_s" in r
                 else "")  # fmt: skip
        print(f"{r['model']:6} {r['path']:16} {r['seconds_to_first_response']:8.3f} {ratio:>8} "
              f"{r['artifact_bytes'] / 1e9:11.2f} {r['output_matches']}{bound}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
