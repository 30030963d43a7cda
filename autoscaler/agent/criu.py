"""CRIU dump and restore of a worker's process tree, on the host or inside a pod's namespaces.

The CRIU binary comes from scripts/install-criu.sh (a private root with its own loader); it is
found through $AUTOSCALER_CRIU, then $AUTOSCALER_CACHE/criu-root/bin/criu, then the repository's
.cache, then `criu` on PATH if it is new enough. Every run keeps its log; failures raise
CriuError with the log's tail, and a restore whose PIDs are taken raises PidTaken before CRIU
runs (CRIU would only say "File exists").

Namespaces: CRIU refuses to dump a process of a nested pid namespace from outside, so for a
worker in a pod both dump and restore run through `nsenter -t <init> -p -m -n -i -u` (the
pod's init for a dump; a placeholder init that reaps for a restore). The CRIU binary, the
images and the logs must then be visible at the same paths inside that mount namespace.

Page fill: by default (`page_fill="auto"`) a restore leaves the private anonymous pages to
autoscaler.agent.pagefill, which copies them into place with many threads while the tree is
still stopped; CRIU's own fill is single-threaded. "criu" keeps CRIU's fill (and "auto" falls
back to it, saying so in the result, where the kernel has no usable userfaultfd).
`fill_while_running=True` lets the caller continue the tree before the fill is done (the
process's own faults are served meanwhile); the result's `fill` is then a PendingFill that the
caller must finish (or close).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from autoscaler.agent import images, kdat, lazymarks, pagefill
from autoscaler.agent.errors import CriuError, CriuNotFound, PidTaken

MIN_VERSION = (4, 2)
LOG_TAIL_LINES = 25
PR_SET_CHILD_SUBREAPER = 36
ALL_NAMESPACES = ("pid", "mnt", "net", "ipc", "uts")
_NSENTER_FLAGS = {"pid": "-p", "mnt": "-m", "net": "-n", "ipc": "-i", "uts": "-u", "cgroup": "-C"}
PAGE_FILL_MODES = ("auto", "parallel", "criu")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def criu_candidates() -> list[Path]:
    """Where CRIU is looked for, in order."""
    out: list[Path] = []
    if env := os.environ.get("AUTOSCALER_CRIU"):
        out.append(Path(env))
    if cache := os.environ.get("AUTOSCALER_CACHE"):
        out.append(Path(cache) / "criu-root" / "bin" / "criu")
    out.append(_repo_root() / ".cache" / "criu-root" / "bin" / "criu")
    if on_path := shutil.which("criu"):
        out.append(Path(on_path))
    return out


def _parse_version(text: str) -> tuple[int, ...]:
    for line in text.splitlines():
        if line.startswith("Version:"):
            return tuple(int(p) for p in line.split(":", 1)[1].strip().split(".") if p.isdigit())
    return ()


def criu_version(criu: Path | None = None) -> str:
    """CRIU's version string (e.g. '4.2.1')."""
    binary = criu or find_criu()
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return ".".join(str(p) for p in _parse_version(out)) or "unknown"


_found: Path | None = None


def find_criu() -> Path:
    """The first CRIU binary that runs and is at least 4.2 (older ones fail on this kernel)."""
    global _found
    if _found is not None:
        return _found
    tried = []
    for cand in criu_candidates():
        if not cand.exists():
            tried.append(f"{cand} (absent)")
            continue
        try:
            out = subprocess.run(
                [str(cand), "--version"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
        except OSError as exc:
            tried.append(f"{cand} ({exc})")
            continue
        version = _parse_version(out)
        if version >= MIN_VERSION:
            _found = cand
            return cand
        tried.append(f"{cand} (version {version or 'unreadable'} < 4.2)")
    raise CriuNotFound(
        "no usable CRIU >= 4.2 found; run scripts/install-criu.sh or set AUTOSCALER_CRIU. "
        "Tried: " + "; ".join(tried)
    )


@dataclass(frozen=True)
class CriuOptions:
    """The CRIU options a worker needs. Defaults suit a worker that follows the contract
    (listeners opened only after restore, stdio not on a terminal)."""

    tcp_established: bool = False  # dump live TCP connections (same node only)
    tcp_close: bool = False  # restore established TCP connections closed
    ext_unix_sk: bool = True  # allow Unix sockets connected to peers outside the tree
    file_locks: bool = True
    link_remap: bool = True  # files unlinked while open
    shell_job: bool = False  # the tree belongs to a terminal session
    leave_running: bool = False  # dump only: keep the original running
    leave_stopped: bool = False  # restore only: the tree stays stopped until continue_tree()
    manage_cgroups: bool = False
    verbosity: int = 2
    extra_args: tuple[str, ...] = ()
    # restore only: who copies the memory pages into place (see the module's docstring)
    page_fill: str = "auto"
    page_fill_threads: int = pagefill.DEFAULT_THREADS
    page_fill_chunk_bytes: int = pagefill.DEFAULT_CHUNK_BYTES
    page_fill_order: str = pagefill.DEFAULT_FILL_ORDER  # see pagefill.fill_order
    # (dump-time pid, page address) filled before the rest: a working set an earlier restore
    # of the same images faulted on while it ran (PendingFill.faults)
    page_fill_first: tuple[tuple[int, int], ...] = ()
    # restore only, with the parallel fill: return (and continue the tree, unless
    # leave_stopped) once CRIU is done; the fill goes on beside the process (RestoreResult.fill)
    fill_while_running: bool = False
    # keep CRIU's kernel-feature cache where /run is not a tmpfs (autoscaler.agent.kdat)
    kdat_cache: bool = True

    def __post_init__(self) -> None:
        if self.page_fill not in PAGE_FILL_MODES:
            raise ValueError(f"page_fill must be one of {PAGE_FILL_MODES}, "
                             f"not {self.page_fill!r}")  # fmt: skip
        if self.page_fill_threads < 1:
            raise ValueError(f"page_fill_threads must be >= 1, not {self.page_fill_threads}")
        if self.page_fill_order not in pagefill.FILL_ORDERS:
            raise ValueError(f"page_fill_order must be one of {pagefill.FILL_ORDERS}, "
                             f"not {self.page_fill_order!r}")  # fmt: skip
        chunk = self.page_fill_chunk_bytes
        if chunk < pagefill.PAGE or chunk % pagefill.PAGE:
            raise ValueError(f"page_fill_chunk_bytes must be a multiple of {pagefill.PAGE}, "
                             f"not {chunk}")  # fmt: skip

    def parallel_fill(self) -> bool:
        """Whether a restore with these options fills pages with autoscaler.agent.pagefill."""
        if self.page_fill == "criu":
            return False
        if self.page_fill == "parallel":
            return True
        return pagefill.supported()

    def args(self, operation: str) -> list[str]:
        out = [f"-v{self.verbosity}"]
        if self.tcp_established:
            out.append("--tcp-established")
        if self.tcp_close and operation == "restore":
            out.append("--tcp-close")
        if self.ext_unix_sk:
            out.append("--ext-unix-sk")
        if self.file_locks:
            out.append("--file-locks")
        if self.link_remap:
            out.append("--link-remap")
        if self.shell_job:
            out.append("--shell-job")
        if self.leave_running and operation == "dump":
            out.append("--leave-running")
        if self.leave_stopped and operation == "restore":
            out.append("--leave-stopped")
        if self.manage_cgroups:
            out.append("--manage-cgroups")
        out.extend(self.extra_args)
        return out


@dataclass(frozen=True)
class NamespaceTarget:
    """Run CRIU inside the namespaces of `pid` (a pod's init, or a placeholder that reaps)."""

    pid: int
    namespaces: tuple[str, ...] = ALL_NAMESPACES
    # restore only: cgroup.procs files CRIU is moved into before it starts (the target
    # container's cgroups, policy.cgroup_procs_files), with CRIU's own cgroup handling off, so
    # the restored tree is in the pod's cgroups, not the agent's or the dumped pod's
    join_cgroups: tuple[str, ...] = ()

    def nsenter_prefix(self) -> list[str]:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise CriuNotFound("nsenter (util-linux) is needed to run CRIU in namespaces")
        flags = [_NSENTER_FLAGS[n] for n in self.namespaces]
        return [nsenter, "-t", str(self.pid), *flags, "--"]

    def describe(self) -> str:
        return f"the pid namespace of {self.pid}"

    def root(self) -> Path:
        """The target's filesystem root as the agent sees it."""
        return Path(f"/proc/{self.pid}/root")


@dataclass(frozen=True)
class DumpResult:
    seconds: float
    log_path: Path
    pids: tuple[int, ...]  # every PID/TID of the dumped tree (as seen in its pid namespace)
    root_pid: int
    kdat: str | None = None  # what kdat.ensure did ("off": not asked)
    # processes whose pagemap CRIU left without lazy marks (its stack-test bug) and the agent
    # marked again (autoscaler.agent.lazymarks)
    lazy_marks_repaired: tuple[int, ...] = ()


@dataclass(frozen=True)
class RestoreResult:
    pid: int  # the root's PID inside its pid namespace (== host_pid without a target)
    host_pid: int  # the same process seen from the agent
    seconds: float  # CRIU, plus the wait for the parallel page fill when there was one
    log_path: Path
    # the parallel page fill's figures (pagefill.FillStats.as_dict()); None: CRIU filled them
    page_fill: dict[str, float | int | str] | None = None
    kdat: str | None = None  # what kdat.ensure did ("off": not asked)
    # fill_while_running: the fill still going on (page_fill is then None; finish() says)
    fill: PendingFill | None = None


class PendingFill:
    """A parallel page fill that goes on while the restored tree runs (fill_while_running).

    Why a handle: the CUDA restore and the worker's own start-up can then overlap the fill,
    and the caller decides when to wait. `ready_to_continue()` before continuing the tree (a
    fill that already failed must never let it run), `finish()` for the figures (raising, the
    tree killed, if it failed), `close()` on every path."""

    def __init__(self, server: pagefill.LazyPagesServer, host_pid: int, log_path: Path,
                 prefetch: Future[dict[str, int]] | None,
                 prefetcher: ThreadPoolExecutor | None, timeout_s: float) -> None:  # fmt: skip
        self.server = server
        self.host_pid = host_pid
        self.log_path = log_path
        self._prefetch = prefetch
        self._prefetcher = prefetcher
        self._timeout_s = timeout_s
        self._stats: dict[str, float | int | str] | None = None
        self._closed = False

    def _failed(self, exc: BaseException) -> CriuError:
        kill_restored(self.host_pid)
        self.close()
        return self._error_for(exc, "")

    def _error_for(self, exc: BaseException, when: str) -> CriuError:
        return CriuError("restore", 0, str(self.log_path), f"the parallel page fill failed"
                         f"{when}, the restored tree was killed: {exc}")  # fmt: skip

    @property
    def faults(self) -> list[tuple[int, int, int]]:
        """The faults served while the tree ran, (dump-time pid, page address, bytes of its
        lazy range) in the order served: after finish(), the working set to fill first next
        time (CriuOptions.page_fill_first)."""
        return self.server.faults

    def ready_to_continue(self) -> None:
        """Raise (the tree killed) if the fill failed already; else mark the tree running."""
        if (exc := self.server.error) is not None:
            raise self._failed(exc) from exc
        self.server.mark_running()

    def failure(self) -> CriuError | None:
        """The fill's failure, if it failed (its server killed the tree): the reason to give
        for a restore that then broke, rather than what broke next."""
        if (exc := self.server.error) is None:
            return None
        return self._error_for(exc, " while the tree ran")

    def finish(self) -> dict[str, float | int | str]:
        """Wait for every page; the fill's figures. A failed fill kills the tree (if its
        server has not already) and raises CriuError."""
        if self._stats is None:
            try:
                filled = self.server.wait_filled(self._timeout_s)
            except pagefill.PageFillError as exc:  # wait_filled wraps the server's own error
                raise self._failed(self.server.error or exc) from exc
            self._stats = {**filled.as_dict(), **_prefetched(self._prefetch)}
            self.close()
        return self._stats

    def close(self) -> None:
        """Let go of the server (after finish, or when the restore is abandoned: the tree must
        be dead or stopped by then, since a running one would read zeros). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None


def _kdat_cache(options: CriuOptions, target: NamespaceTarget | None) -> str:
    """CRIU's kernel-feature cache where this CRIU will look for it (a hint: never raises)."""
    if not options.kdat_cache:
        return "off"
    return kdat.ensure(find_criu(), target.root() if target else Path("/"))


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log empty)"


def _run_criu(
    operation: str,
    args: Sequence[str],
    log_path: Path,
    target: NamespaceTarget | None,
    timeout_s: float,
) -> float:
    cmd = [*(target.nsenter_prefix() if target else []), str(find_criu()), operation, *args]
    join = target.join_cgroups if target is not None and operation == "restore" else ()
    if join:
        cmd.append("--manage-cgroups=ignore")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            preexec_fn=partial(_join_cgroups, join) if join else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CriuError(operation, -1, str(log_path), f"timed out after {timeout_s} s\n"
                        + _log_tail(log_path)) from exc
    except subprocess.SubprocessError as exc:  # joining the target's cgroups failed
        raise CriuError(operation, -1, str(log_path),
                        f"could not move CRIU into the cgroups {list(join)}: {exc}") from exc
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = _log_tail(log_path)
        if proc.stderr.strip():
            tail = proc.stderr.strip()[-2000:] + "\n" + tail
        raise CriuError(operation, proc.returncode, str(log_path), tail)
    return seconds


def _join_cgroups(files: Sequence[str]) -> None:
    """In the child before exec: move it into these cgroups (its children, CRIU's restored
    tree among them, inherit them)."""
    for path in files:
        with open(path, "w") as f:
            f.write("0")


def dump(
    pid: int,
    images_dir: Path,
    logs_dir: Path,
    options: CriuOptions | None = None,
    target: NamespaceTarget | None = None,
    timeout_s: float = 600.0,
) -> DumpResult:
    """Checkpoint the tree rooted at `pid` (a PID inside target's namespace when given)."""
    options = options or CriuOptions()
    images_dir.mkdir(parents=True, exist_ok=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = logs_dir / "dump.log"
    args = [
        "-t", str(pid),
        "-D", str(images_dir),
        "--work-dir", str(logs_dir),
        "-o", log_path.name,
        *options.args("dump"),
    ]
    cache = _kdat_cache(options, target)
    seconds = _run_criu("dump", args, log_path, target, timeout_s)
    tree = read_pstree(images_dir)
    pids = tuple(sorted({p for entry in tree for p in (entry.pid, *entry.threads)}))
    try:
        repaired = lazymarks.repair(images_dir, [(e.pid, e.threads) for e in tree])
    except (OSError, ValueError) as exc:
        raise CriuError("dump", 0, str(log_path), f"the dump's images are unreadable after "
                        f"CRIU succeeded: {exc}") from exc  # fmt: skip
    return DumpResult(seconds=seconds, log_path=log_path, pids=pids, root_pid=tree[0].pid,
                      kdat=cache, lazy_marks_repaired=tuple(repaired))  # fmt: skip


def restore(
    images_dir: Path,
    logs_dir: Path,
    options: CriuOptions | None = None,
    target: NamespaceTarget | None = None,
    log_name: str = "restore.log",
    timeout_s: float = 600.0,
) -> RestoreResult:
    """Restore the tree in images_dir, detached; its PIDs must be free where it lands."""
    options = options or CriuOptions()
    logs_dir.mkdir(parents=True, exist_ok=True)
    tree = read_pstree(images_dir)
    ensure_pids_free(sorted({p for e in tree for p in (e.pid, *e.threads)}), target)
    log_path = logs_dir / log_name
    pidfile = logs_dir / (Path(log_name).stem + ".pid")
    pidfile.unlink(missing_ok=True)
    if target is None:
        become_subreaper()
    parallel = options.parallel_fill()
    # with the parallel fill the tree stays stopped until every page is in place
    run_options = replace(options, leave_stopped=True) if parallel else options
    args = [
        "-D", str(images_dir),
        "--work-dir", str(logs_dir),
        "-o", log_path.name,
        "--pidfile", str(pidfile),
        "--restore-detached",
        *run_options.args("restore"),
        *(["--lazy-pages"] if parallel else []),
    ]  # fmt: skip
    server = (
        pagefill.LazyPagesServer(
            images_dir, logs_dir, threads=options.page_fill_threads,
            chunk_bytes=options.page_fill_chunk_bytes, order=options.page_fill_order,
            first=options.page_fill_first,
        )
        if parallel
        else None
    )
    stats: dict[str, float | int | str] | None = None
    pending: PendingFill | None = None
    start = time.perf_counter()
    cache = _kdat_cache(options, target)
    prefetch: Future[dict[str, int]] | None = None
    prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if server else None
    try:
        if server is not None and prefetcher is not None:
            # what CRIU still reads itself, asked for while it starts (a hint: a failure is
            # reported in the fill's figures; CRIU reads what it needs regardless)
            root = Path(f"/proc/{target.pid}/root") if target else Path("/")
            prefetch = prefetcher.submit(
                pagefill.prefetch_eager_pages, images_dir, [e.pid for e in tree], root
            )
            server.start()
        try:
            _run_criu("restore", args, log_path, target, timeout_s)
        except CriuError as exc:
            if "File exists" in exc.log_tail and "Can't fork" in exc.log_tail:
                taken = tree[0].pid
                raise PidTaken(taken, target.describe() if target else "the host") from exc
            raise
        inner = int(pidfile.read_text().strip())
        host = host_pid_of(target, inner) if target else inner
        if target is None:
            reap_when_exits(host)
        if server is not None:  # from here on the handle lets go of the server
            pending = PendingFill(server, host, log_path, prefetch, prefetcher, timeout_s)
            if not options.fill_while_running:
                stats = pending.finish()  # every page in place; a failure kills the tree
            elif not server.arm_kill(partial(kill_restored, host)):
                pending.ready_to_continue()  # raises: the fill failed already
    finally:
        if pending is None:
            if server is not None:
                server.close()
            if prefetcher is not None:
                prefetcher.shutdown(wait=False, cancel_futures=True)
    seconds = time.perf_counter() - start
    fill = pending if options.fill_while_running else None  # the caller's to finish
    if parallel and not options.leave_stopped:
        if fill is not None:
            fill.ready_to_continue()
        continue_tree(host)
    return RestoreResult(pid=inner, host_pid=host, seconds=seconds, log_path=log_path,
                         page_fill=stats, kdat=cache, fill=fill)  # fmt: skip


def _prefetched(prefetch: Future[dict[str, int]] | None) -> dict[str, float | int | str]:
    """The prefetch's figures for the fill's stats (it ran alongside CRIU)."""
    if prefetch is None:
        return {}
    if not prefetch.done():  # still asking (slow metadata reads): never waited for
        return {"prefetch_unfinished": 1}
    try:
        return {f"prefetch_{k}": v for k, v in prefetch.result().items()}
    except Exception as exc:  # a hint that failed: said, not raised (CRIU read what it needed)
        return {"prefetch_error": f"{type(exc).__name__}: {exc}"}


def kill_restored(host_pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL the restored tree (its process group, the worker being a session leader, and
    every descendant, also one that left that group: a page fill that fails while the tree
    runs lets go of all of their memory once this returns)."""
    try:
        pgid = os.getpgid(host_pid)
    except ProcessLookupError:
        return
    descendants = tree_pids(host_pid)[1:]  # found before the root dies and they are re-parented
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    # Never signal our own group (a restored tree that is not a session leader shares it).
    if pgid != os.getpgid(0):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(host_pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{host_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    while not all(map(exited, descendants)) and time.monotonic() < deadline:
        time.sleep(0.01)  # a zombie is enough: re-parented, it may have nobody to reap it


def exited(pid: int) -> bool:
    """Whether `pid` runs no more (gone, or a zombie not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def tree_pids(host_pid: int) -> list[int]:
    """A process and all its descendants (host PIDs, parents first), from /proc's children."""
    out: list[int] = []
    todo = [host_pid]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                todo.extend(int(c) for c in children.split())
    return out


def continue_tree(host_pid: int) -> None:
    """SIGCONT a tree restored with leave_stopped (every process of it)."""
    for pid in tree_pids(host_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# --- PIDs and namespaces ---------------------------------------------------------------------
_subreaper_set = False
_reapers: dict[int, threading.Thread] = {}


def become_subreaper() -> None:
    """Make this process the reaper of what it restores on the host.

    A detached restore leaves the restored root without a parent; as a subreaper the agent
    inherits it and reaps it when it dies, so a dead worker never lingers as a zombie holding
    its PID (which would block the next restore with the same PID).
    """
    global _subreaper_set
    if _subreaper_set:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    _subreaper_set = True


def reap_when_exits(pid: int) -> None:
    """Wait for a restored child in a daemon thread (only our own children can be waited for)."""

    def wait() -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # not our child (already reaped, or re-parented elsewhere)
        finally:
            _reapers.pop(pid, None)

    thread = threading.Thread(target=wait, name=f"reap-{pid}", daemon=True)
    _reapers[pid] = thread
    thread.start()


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def ns_pids(pid: int) -> list[int]:
    """NSpid of a process: its PID in each pid namespace, outermost first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(p) for p in line.split()[1:]]
    except OSError:
        pass
    return []


def _all_tids() -> Iterable[int]:
    """Every process and thread id visible in /proc (threads hide under /proc/<pid>/task)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for task in os.scandir(f"/proc/{entry.name}/task"):
                yield int(task.name)
        except OSError:
            continue


def pids_in_namespace(target: NamespaceTarget) -> dict[int, int]:
    """Map inner PID -> host PID of every task in target's pid namespace."""
    ns = _pid_ns(target.pid)
    if ns is None:
        raise ProcessLookupError(f"namespace target {target.pid} does not exist")
    out: dict[int, int] = {}
    for tid in _all_tids():
        if _pid_ns(tid) == ns:
            nspids = ns_pids(tid)
            if nspids:
                out[nspids[-1]] = tid
    return out


def host_pid_of(target: NamespaceTarget, inner_pid: int) -> int:
    """The host PID of the process that has `inner_pid` inside target's pid namespace."""
    mapping = pids_in_namespace(target)
    if inner_pid not in mapping:
        raise ProcessLookupError(f"no pid {inner_pid} in {target.describe()}")
    return mapping[inner_pid]


def ensure_pids_free(pids: Iterable[int], target: NamespaceTarget | None) -> None:
    """Raise PidTaken if any PID the restore needs is held (zombies included)."""
    if target is None:
        for pid in pids:
            if os.path.exists(f"/proc/{pid}"):
                raise PidTaken(pid, "the host")
        return
    taken = pids_in_namespace(target)
    for pid in pids:
        if pid in taken:
            raise PidTaken(pid, target.describe())


# --- images ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PstreeEntry:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]


def _decode_pstree_entry(msg: bytes) -> PstreeEntry:
    """Decode CRIU's pstree_entry (pid=1, ppid=2, pgid=3, sid=4, threads=5, packed or not)."""
    f = images.fields(msg)
    threads: list[int] = []
    for value in f.get(5, []):
        threads.extend(images.packed_varints(value) if isinstance(value, bytes) else [value])
    return PstreeEntry(
        pid=int(f[1][0]),  # type: ignore[arg-type]
        ppid=int(f.get(2, [0])[0]),  # type: ignore[arg-type]
        pgid=int(f.get(3, [0])[0]),  # type: ignore[arg-type]
        sid=int(f.get(4, [0])[0]),  # type: ignore[arg-type]
        threads=tuple(threads),
    )


def read_pstree(images_dir: Path) -> list[PstreeEntry]:
    """The process tree CRIU recorded (root first), read from pstree.img."""
    path = images_dir / "pstree.img"
    if not path.exists():
        raise CriuError("read images", 1, str(path), "pstree.img is missing")
    try:
        out = [_decode_pstree_entry(msg) for msg in images.entries(path)]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise CriuError("read images", 1, str(path), f"pstree.img unreadable: {exc}") from exc
    if not out:
        raise CriuError("read images", 1, str(path), "pstree.img holds no process")
    return out
