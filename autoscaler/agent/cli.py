"""`autoscaler agent ...`: serve the node agent's API, or run one operation here and now.

One-shot commands act directly on this machine as the invoking user (root, normally) and are
not subject to the API's PID policy: whoever can run them can run CRIU anyway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoscaler.agent.node_memory import PIN_RESERVE_FRACTION
from autoscaler.errors import ConfigError

if TYPE_CHECKING:
    from autoscaler.agent.server import ContainerRuntime

DEFAULT_CACHE = "/var/lib/autoscaler-agent/cache"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, field: str = "size") -> int:
    """'500M', '20G', '1.5Gi', '1048576' -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(field, f"{text!r} is not a size (e.g. 500M, 20G)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def _progress(message: str) -> None:
    print(f"[agent] {message}", file=sys.stderr, flush=True)


def _byte_progress(label: str):
    state = {"last": 0.0, "start": time.monotonic()}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - state["last"] < 0.5 and done != total:
            return
        state["last"] = now
        pct = 100.0 * done / total if total else 100.0
        rate = done / max(now - state["start"], 1e-6) / 1e6
        print(f"\r[agent] {label}: {pct:5.1f}% {done / 1e6:,.1f}/{total / 1e6:,.1f} MB "
              f"({rate:,.0f} MB/s)", end="" if done != total else "\n",
              file=sys.stderr, flush=True)

    return report


def _cache(args: argparse.Namespace):
    from autoscaler.agent.staging import NodeCache

    cache = NodeCache(
        args.cache_dir, parse_size(args.disk_budget, "disk_budget"),
        args.memory_dir, parse_size(args.memory_budget, "memory_budget") if args.memory_dir else 0,
    )
    cache.pin_reserve_fraction = parse_fraction(args.pin_reserve, "pin_reserve")
    return cache


def parse_fraction(text: str, name: str) -> float:
    """A share of the node's memory: "0.1" or "10%", in [0, 1)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(name, f"{text!r} is not a fraction (e.g. 0.1 or 10%)") from None
    if not 0 <= value < 1:
        raise ConfigError(name, f"{text!r} must be at least 0 and under 1 (100%)")
    return value


def _store(args: argparse.Namespace):
    from autoscaler.agent.store import open_store

    try:
        return open_store(args.store)
    except ValueError as exc:
        raise ConfigError("store", str(exc)) from exc


def _print(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _warm_criu_kdat() -> None:
    """CRIU's kernel-feature cache made now, so the first restore does not probe the kernel."""
    from autoscaler.agent import criu as criu_mod
    from autoscaler.agent import kdat
    from autoscaler.agent.errors import CriuNotFound

    try:
        status = kdat.ensure(criu_mod.find_criu())
    except CriuNotFound as exc:
        status = f"unavailable: {exc}"
    print(f"[agent] CRIU kernel-feature cache: {status}", file=sys.stderr, flush=True)


def _check_preload_flags(args: argparse.Namespace) -> None:
    """One preloader by path, or a folder of per-GPU ones: not both."""
    if getattr(args, "preload_socket", None) and getattr(args, "preload_socket_dir", None):
        raise ConfigError("preload_socket",
                          "give --preload-socket or --preload-socket-dir, not both")


def _pod_starter(args: argparse.Namespace) -> Callable[[Any], Any] | None:
    """For --start-pods: checks the flags before anything starts; returns a builder that takes
    the Agent (None without --start-pods)."""
    if not args.start_pods:
        return None
    if args.container_runtime != "cgroup":
        raise ConfigError("start_pods", "--start-pods finds pods' placeholders from /proc: "
                          "it needs --container-runtime cgroup")  # fmt: skip
    if not args.node_name:
        raise ConfigError("node_name", "--start-pods needs --node-name or $NODE_NAME (the "
                          "DaemonSet sets it from spec.nodeName)")  # fmt: skip
    if args.pod_poll <= 0:
        raise ConfigError("pod_poll", f"must be > 0, not {args.pod_poll}")
    from autoscaler.agent.containers import CgroupContainerRuntime
    from autoscaler.agent.pod_starts import PodStarter
    from autoscaler.cluster.adapter import connect

    api = connect(args.kubeconfig, in_cluster=args.kubeconfig is None)
    return lambda agent: PodStarter(agent, api, args.node_name, CgroupContainerRuntime(),
                                    poll_s=args.pod_poll)  # fmt: skip


def _container_runtime(name: str) -> ContainerRuntime | None:
    if name == "none":
        return None
    from autoscaler.agent.containers import CgroupContainerRuntime

    return CgroupContainerRuntime()


def cmd_serve(args: argparse.Namespace) -> int:
    from autoscaler.agent.policy import PidPolicy
    from autoscaler.agent.server import Agent, AgentConfig, serve

    _check_preload_flags(args)
    if not args.token_file and not args.token_review:
        raise ConfigError("token_file", "the API needs --token-file and/or --token-review")
    if args.token_file and not Path(args.token_file).is_file():
        raise ConfigError("token_file", f"{args.token_file} does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = AgentConfig(
        store=_store(args),
        cache=_cache(args),
        token_file=Path(args.token_file) if args.token_file else None,
        token_review=args.token_review,
        token_review_users=tuple(args.token_review_user),
        policy=PidPolicy(tuple(args.allow_cgroup), tuple(args.allow_ancestor)),
        handshake_root=tuple(Path(r) for r in args.handshake_root),
        log_root=Path(args.log_dir) if args.log_dir else None,
        preload_socket=args.preload_socket,
        preload_socket_dir=args.preload_socket_dir,
        external_check=args.external_check,
        page_fill=args.page_fill,
        page_fill_threads=args.page_fill_threads,
        fill_while_running=args.fill_while_running,
        working_set=args.working_set,
        containers=_container_runtime(args.container_runtime),
    )
    make_starter = _pod_starter(args)  # its flags are checked before anything starts
    agent = Agent(config)
    server = serve(agent, args.host, args.port)
    _warm_criu_kdat()
    starter = make_starter(agent).start() if make_starter is not None else None
    if starter is not None:
        print(f"[agent] starting snapshot pods on node {args.node_name}", file=sys.stderr,
              flush=True)  # fmt: skip
    host, port = server.server_address[:2]
    print(f"[agent] listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if starter is not None:
            starter.stop()
        server.server_close()
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from autoscaler.agent.checkpoint import CheckpointRequest, checkpoint_worker

    model = {}
    for item in args.model:
        if "=" not in item:
            raise ConfigError("model", f"{item!r} is not key=value")
        key, value = item.split("=", 1)
        model[key] = value
    result = checkpoint_worker(_store(args), CheckpointRequest(
        artifact_id=args.id, pid=args.pid, workload=args.workload, model=model,
        handshake_dir=args.handshake_dir, namespace_pid=args.namespace_pid,
        pid_in_namespace=args.pid_in_namespace, leave_running=args.leave_running,
        cuda=args.cuda, handshake_timeout_s=args.timeout,
    ), progress=_progress)
    _print({"artifact_id": result.manifest.id, "bytes": result.manifest.total_bytes,
            "seconds": result.seconds})
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from autoscaler.agent import staging

    _check_preload_flags(args)
    if args.weights_on_gpu and not (args.preload_socket or args.preload_socket_dir):
        raise ConfigError("preload_socket",
                          "--weights-on-gpu needs --preload-socket or --preload-socket-dir")
    socket_path = (
        staging.require_preloader(args.preload_socket, args.preload_socket_dir, args.gpu_uuid)
        if args.weights_on_gpu else None
    )  # refused before any copying
    pin_sockets = (
        staging.pin_preloaders(args.tier, args.preload_socket, args.preload_socket_dir)
        if args.pin_weights else []
    )  # refused before any copying
    cache = _cache(args)
    # a memory copy evicted to make room gives back what preloaders hold for its weights
    sockets = staging.node_preloaders(args.preload_socket, args.preload_socket_dir)
    cache.on_memory_evict = lambda files: staging.release_held_weights(files, sockets)
    held = cache.stage(_store(args), args.id, args.tier,
                       progress=_byte_progress(f"staging {args.id}"), warm=args.warm)
    out = held.to_dict()
    if args.weights_on_gpu:
        manifest = cache.tiers[args.tier].read_manifest(args.id)
        out["weights_on_gpu"] = staging.stage_weights_on_gpu(
            manifest.external_files, socket_path
        )
    if args.pin_weights:
        out["pinned_weights"] = staging.pin_staged_weights(cache, args.id, pin_sockets)
    _print(out)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from autoscaler.agent.criu import CriuOptions
    from autoscaler.agent.restore import RestoreRequest, restore_artifact

    _check_preload_flags(args)
    pairs = []
    for item in args.gpu_pair:
        if "=" not in item:
            raise ConfigError("gpu_pair", f"{item!r} is not OLD_UUID=NEW_UUID")
        old, new = item.split("=", 1)
        pairs.append((old, new))
    outcome = restore_artifact(RestoreRequest(
        artifact_id=args.id, handshake_dir=args.handshake_dir, health_url=args.health_url,
        namespace_pid=args.namespace_pid, gpu_pairs=tuple(pairs),
        ready_timeout_s=args.timeout, use_store=not args.local_only, verify=args.verify,
        verify_digest=args.verify_digest,
        preload_socket=args.preload_socket, preload_socket_dir=args.preload_socket_dir,
        external_check=args.external_check, criu_options=CriuOptions(page_fill=args.page_fill,
                                 page_fill_threads=args.page_fill_threads),
        fill_while_running=args.fill_while_running, working_set=args.working_set,
    ), _cache(args), _store(args), _progress)  # fmt: skip
    _print(outcome.to_dict())
    return 0 if outcome.ok else 1


def cmd_inventory(args: argparse.Namespace) -> int:
    cache = _cache(args)
    _print({"artifacts": [a.to_dict() for a in cache.inventory(page_cache=True)],
            "tiers": [u.__dict__ for u in cache.usage()]})
    return 0


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="node-local disk cache")
    p.add_argument("--disk-budget", default="100G", help="disk cache budget (e.g. 200G)")
    p.add_argument("--memory-dir", default=None, help="tmpfs directory for the memory tier")
    p.add_argument("--memory-budget", default="0", help="memory tier budget (e.g. 32G)")
    p.add_argument(
        "--pin-reserve", default=str(PIN_RESERVE_FRACTION),
        help="share of the node's memory a weights pin must leave available by the kernel's "
             "MemAvailable, less the agent's own pins (0.1 or 10%%; default %(default)s)",
    )  # fmt: skip


def _add_restore_options(p: argparse.ArgumentParser) -> None:
    from autoscaler.agent.criu import PAGE_FILL_MODES
    from autoscaler.agent.pagefill import DEFAULT_THREADS
    from autoscaler.agent.restore import FILL_WHILE_RUNNING

    p.add_argument(
        "--preload-socket", default=None,
        help="the node's weight preloader (python -m autoscaler.agent.fastload preload "
        "--socket S): restores ask it to load the worker's weights while CRIU runs",
    )  # fmt: skip
    p.add_argument(
        "--preload-socket-dir", default=None,
        help="the folder of the node's per-GPU weight preloaders (fastload preload "
        "--socket-dir D: one socket per GPU, named by its UUID); a restore asks the one of "
        "the GPU the worker is restored onto. Not with --preload-socket",
    )  # fmt: skip
    p.add_argument(
        "--external-check", choices=("hash", "stat"), default="hash",
        help="an external file (the weights) this node has not verified: hash every block "
        "at restore (default), or trust it when its size and mtime are the manifest's "
        "(no read; a same-size rewrite with its mtime put back goes unseen)",
    )  # fmt: skip
    p.add_argument(
        "--page-fill", choices=PAGE_FILL_MODES, default="auto",
        help="who copies a restored worker's memory pages into place: 'parallel' (the agent, "
        "many threads, the tree stopped until done), 'criu' (CRIU's own single-threaded fill) "
        "or 'auto' (parallel where the kernel offers userfaultfd, else criu)",
    )  # fmt: skip
    p.add_argument(
        "--page-fill-threads", type=int, default=DEFAULT_THREADS,
        help=f"threads of the parallel page fill (default {DEFAULT_THREADS}: the CPUs, at most 8)",
    )  # fmt: skip
    p.add_argument(
        "--fill-while-running", choices=FILL_WHILE_RUNNING, default="memory",
        help="let the restored worker run while the parallel fill puts its pages in place (its "
        "own faults served at once), so the CUDA restore overlaps the fill: for copies staged "
        "in 'memory' (default), 'always', or 'off' (the tree waits for every page)",
    )  # fmt: skip
    p.add_argument(
        "--no-working-set", dest="working_set", action="store_false",
        help="while the tree runs during the fill, do not put the pages earlier restores of "
        "the artifact on this node faulted on in place first, and record none (default: "
        "recorded per artifact beside the node cache, and filled first)",
    )  # fmt: skip


def _add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True,
                   help="artifact store: a directory, or shared:/path for a shared volume")


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser("agent", help="node agent: checkpoint, stage, restore")
    sub = agent.add_subparsers(dest="agent_command", metavar="ACTION")

    p = sub.add_parser("serve", help="serve the agent's HTTP API on this node")
    _add_store_arg(p)
    _add_cache_args(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--token-file", help="file holding the bearer token (a mounted Secret)")
    p.add_argument("--token-review", action="store_true",
                   help="also accept tokens that Kubernetes TokenReview authenticates")
    p.add_argument("--token-review-user", action="append", default=[],
                   help="user allowed through TokenReview (system:serviceaccount:NS:NAME)")
    p.add_argument("--allow-cgroup", action="append", default=[],
                   help="cgroup path prefix whose processes requests may touch (/kubepods)")
    p.add_argument("--allow-ancestor", action="append", type=int, default=[],
                   help="PID whose descendants requests may touch")
    p.add_argument("--handshake-root", action="append", default=[],
                   help="handshake directories must lie under this (repeat for several)")
    p.add_argument("--log-dir", help="where restore logs go (default: beside the disk cache)")
    p.add_argument(
        "--container-runtime", choices=("none", "cgroup"), default="none",
        help="how /v1/checkpoint resolves a container_id (containerd://, cri-o://, docker://): "
             "cgroup = from the node's /proc (needs hostPID; docs/agent.md); none = refused",
    )  # fmt: skip
    p.add_argument(
        "--start-pods", action="store_true",
        help="restore new pods of snapshot workloads on this node by itself: watch the pods "
             "bound to --node-name and answer their placeholder entrypoints "
             "(autoscaler/agent/pod_starts.py; needs --container-runtime cgroup)",
    )  # fmt: skip
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="this node's name, for --start-pods (default: $NODE_NAME)")
    p.add_argument("--kubeconfig",
                   help="for --start-pods outside a cluster (default: the pod's ServiceAccount)")
    p.add_argument("--pod-poll", type=float, default=1.0,
                   help="seconds between two looks at this node's pods (--start-pods)")
    _add_restore_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("checkpoint", help="checkpoint a running worker into the store")
    _add_store_arg(p)
    p.add_argument("--id", required=True, help="artifact id")
    p.add_argument("--pid", type=int, required=True, help="worker PID (as seen here)")
    p.add_argument("--workload", required=True)
    p.add_argument("--model", action="append", default=[], help="identity, key=value")
    p.add_argument("--handshake-dir")
    p.add_argument("--namespace-pid", type=int, help="the pod's init (host PID)")
    p.add_argument("--pid-in-namespace", type=int, help="the worker's PID inside the pod")
    p.add_argument("--leave-running", action="store_true")
    p.add_argument("--cuda", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--timeout", type=float, default=600.0, help="handshake timeout (s)")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("stage", help="copy an artifact into the node cache")
    _add_store_arg(p)
    _add_cache_args(p)
    p.add_argument("--id", required=True)
    p.add_argument("--tier", choices=("disk", "memory"), default="disk")
    p.add_argument("--warm", action="store_true", help="read it into the page cache too")
    p.add_argument(
        "--weights-on-gpu", action="store_true",
        help="also have the node's weight preloader (--preload-socket) load the worker's "
        "weights onto its GPU now, for the restore to find there (holds that GPU memory)",
    )  # fmt: skip
    p.add_argument(
        "--pin-weights", action="store_true",
        help="with --tier memory: also have the node's weight preloaders page-lock the "
        "worker's weights where they lie, so a restore loads them by one DMA (keeps them "
        "resident; no GPU memory)",
    )  # fmt: skip
    p.add_argument("--preload-socket", default=None, help="the node's weight preloader")
    p.add_argument("--preload-socket-dir", default=None,
                   help="the node's per-GPU weight preloaders (fastload preload --socket-dir)")
    p.add_argument("--gpu-uuid", default=None,
                   help="with --preload-socket-dir: the GPU whose preloader holds the weights "
                   "(the GPU the next replica will get; optional on a node with one preloader)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("restore", help="restore a worker from the best copy")
    _add_store_arg(p)
    _add_cache_args(p)
    p.add_argument("--id", required=True)
    p.add_argument("--handshake-dir")
    p.add_argument("--health-url")
    p.add_argument("--namespace-pid", type=int, help="placeholder init of the target pod")
    p.add_argument("--gpu-pair", action="append", default=[], help="OLD_UUID=NEW_UUID")
    p.add_argument("--timeout", type=float, default=120.0, help="ready timeout (s)")
    p.add_argument("--local-only", action="store_true", help="never restore from the store")
    p.add_argument(
        "--verify", choices=("alongside", "before"), default="alongside",
        help="hash the copy while CRIU restores it stopped (default), or before CRIU starts",
    )  # fmt: skip
    p.add_argument(
        "--verify-digest", choices=("blake3", "sha256"), default="blake3",
        help="block digests the copy is checked against (default blake3: ~40% of sha256's "
        "CPU; sha256 where the artifact has no BLAKE3 digests)",
    )  # fmt: skip
    _add_restore_options(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("inventory", help="what the node cache holds")
    _add_cache_args(p)
    p.set_defaults(func=cmd_inventory)
