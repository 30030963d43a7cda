"""The weight preloader's DaemonSet: its flags parse with fastload's own parser, it shares the
socket folder with the agent (each pointed at its own mount of the same host path), it runs
where the agent runs with the privileges docs/deploy.md explains, and it takes no GPU away from
the workers. Also: the preloader image holds only the package's source, so what the preloader
imports must be the standard library, torch and numpy (checked here on the source)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

from autoscaler.agent.fastload import build_parser
from tests.deploy.manifests import REPO, find, pod_spec, render

SOCKET_HOST_PATH = "/run/autoscaler/preload"


def preloader_spec() -> dict[str, Any]:
    return pod_spec(find(render("base"), "DaemonSet", "autoscaler-preloader"))


def agent_spec() -> dict[str, Any]:
    return pod_spec(find(render("base"), "DaemonSet", "autoscaler-agent"))


def flag_value(args: list[str], flag: str) -> str:
    """The value of `--flag=value` (the form the manifests use); a clear failure if absent."""
    values = [a.partition("=")[2] for a in args if a.startswith(flag + "=")]
    assert len(values) == 1, f"expected one {flag}=... in {args}"
    return values[0]


def mount_of_host_path(spec: dict[str, Any], host_path: str) -> dict[str, Any]:
    """The one volumeMount (of the first container) whose volume is hostPath `host_path`."""
    volumes = {
        v["name"] for v in spec.get("volumes", []) if v.get("hostPath", {}).get("path") == host_path
    }
    mounts = [m for m in spec["containers"][0].get("volumeMounts", []) if m["name"] in volumes]
    assert len(mounts) == 1, f"expected one mount of hostPath {host_path}, found {mounts}"
    return mounts[0]


def test_the_preloader_flags_parse_with_fastloads_parser():
    """As `python -m autoscaler.agent.fastload` (its __main__ block) parses them."""
    container = preloader_spec()["containers"][0]
    assert container["command"] == ["python", "-m", "autoscaler.agent.fastload"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "preload"
    assert args.socket_dir and args.socket is None
    assert args.devices == "all"  # one preloader per GPU of the node
    assert args.threads == build_parser().parse_args(["preload", "--socket-dir=x"]).threads


def test_worker_pods_of_any_uid_can_connect_to_the_sockets():
    """connect() on a Unix socket needs write permission on its file: non-root workers take
    their weights only if others may write (what they may do is checked per peer uid)."""
    args = build_parser().parse_args(preloader_spec()["containers"][0]["args"])
    assert args.socket_mode & 0o006 == 0o006
    assert args.socket_mode & 0o111 == 0  # nothing to execute on a socket


def test_agent_and_preloader_meet_in_the_same_host_folder():
    agent, preloader = agent_spec(), preloader_spec()
    agent_mount = mount_of_host_path(agent, SOCKET_HOST_PATH)
    preloader_mount = mount_of_host_path(preloader, SOCKET_HOST_PATH)
    # each is pointed at the place where that host folder is mounted in its own container
    agent_args = agent["containers"][0]["args"]
    assert flag_value(agent_args, "--preload-socket-dir") == agent_mount["mountPath"]
    preloader_args = build_parser().parse_args(preloader["containers"][0]["args"])
    assert preloader_args.socket_dir == preloader_mount["mountPath"]
    # the preloader creates the sockets; the agent connects (a write on a socket file)
    assert not preloader_mount.get("readOnly") and not agent_mount.get("readOnly")
    for spec, mount in ((agent, agent_mount), (preloader, preloader_mount)):
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["hostPath"]["type"] == "DirectoryOrCreate"


def test_the_agent_flags_with_the_socket_folder_parse_with_the_agent_cli():
    import argparse

    from autoscaler.agent.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["agent", *agent_spec()["containers"][0]["args"]])
    assert args.preload_socket_dir == SOCKET_HOST_PATH and args.preload_socket is None


def test_the_preloader_reads_staged_weights_where_the_agent_names_them():
    """The agent names staged weights by its own path: the preloader must mount the cache and
    the memory tier at the same places, read-only."""
    agent, preloader = agent_spec(), preloader_spec()
    for host_path in ("/var/lib/autoscaler/cache", "/dev/shm/autoscaler"):
        agent_mount = mount_of_host_path(agent, host_path)
        preloader_mount = mount_of_host_path(preloader, host_path)
        assert preloader_mount["mountPath"] == agent_mount["mountPath"], host_path
        assert preloader_mount["readOnly"] is True, host_path


def test_the_preloader_runs_privileged_with_host_pids_on_gpu_nodes_only():
    agent, spec = agent_spec(), preloader_spec()
    assert spec["hostPID"] is True
    assert spec["containers"][0]["securityContext"]["privileged"] is True
    assert not spec.get("hostNetwork")
    # where the agent runs, no more and no less
    for field in ("nodeSelector", "tolerations", "priorityClassName"):
        assert spec[field] == agent[field], field
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_the_preloader_takes_no_gpu_from_the_workers_but_sees_them_all():
    container = preloader_spec()["containers"][0]
    for section in ("requests", "limits"):
        resources = container["resources"].get(section, {})
        assert not any(key.startswith("nvidia.com/") for key in resources), section
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}


def gibibytes(quantity: str) -> float:
    assert quantity.endswith("Gi"), quantity
    return float(quantity[:-2])


def test_the_preloader_memory_limit_holds_eight_gpus_loading_from_disk_at_once():
    """Each GPU's preloader page-locks its reader areas at start (fastload's defaults); a load
    from disk asks the agent's DISK_PRELOAD_THREADS readers, and those beyond the pool pin
    their own areas while it runs. The limit must hold that on an 8-GPU node, plus torch and
    the CUDA contexts (measured on the H200: 0.48 + 0.12 GiB with one GPU; 1 GiB allowed)."""
    from autoscaler.agent.restore import DISK_PRELOAD_THREADS

    defaults = build_parser().parse_args(["preload", "--socket-dir=x"])
    areas = defaults.threads if defaults.pinned_areas is None else defaults.pinned_areas
    area_bytes = 2 * defaults.chunk_mib * 2**20
    per_gpu = max(areas, DISK_PRELOAD_THREADS) * area_bytes
    resources = preloader_spec()["containers"][0]["resources"]
    limit = gibibytes(resources["limits"]["memory"]) * 2**30
    assert limit >= 2**30 + 8 * per_gpu
    # the request covers what one GPU's preloader holds from the start
    assert gibibytes(resources["requests"]["memory"]) * 2**30 >= 2**30 + areas * area_bytes


def test_the_preloader_has_no_api_access():
    resources = render("base")
    spec = preloader_spec()
    assert spec["automountServiceAccountToken"] is False
    account = find(resources, "ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    bound = [o for o in resources if "roleRef" in o
             and any(s["name"] == spec["serviceAccountName"] for s in o["subjects"])]  # fmt: skip
    assert bound == []


# ---- what the preloader image must hold ----------------------------------------------------

ALLOWED_THIRD_PARTY = {"torch", "numpy"}  # in the CUDA PyTorch base image


def module_file(name: str) -> Path | None:
    """The source of an `autoscaler` module or package."""
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """Every module an `import` in the file names, at any depth (function-level imports are
    what the preloader runs), TYPE_CHECKING blocks included (a superset is the safe side)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            out.add(target)
            # `from autoscaler.agent import fastload` imports a submodule
            out |= {f"{target}.{a.name}" for a in node.names if module_file(f"{target}.{a.name}")}
    return out


def import_closure(roots: list[str]) -> tuple[set[str], set[str]]:
    """(autoscaler modules reached, top-level names of everything else imported)."""
    seen: set[str] = set()
    others: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = module_file(name)
        assert path is not None, f"{name}: no source under {REPO}"
        for imported in imported_names(path, name):
            if imported.split(".")[0] == "autoscaler":
                if module_file(imported):
                    todo.append(imported)
            else:
                others.add(imported.split(".")[0])
    return seen, others


def test_the_preloader_imports_only_the_standard_library_torch_and_numpy():
    """`python -m autoscaler.agent.fastload preload` in an image without `pip install .`."""
    reached, others = import_closure(["autoscaler.agent.fastload"])
    assert {"autoscaler.agent.cuda", "autoscaler.agent.preloaders"} <= reached
    assert others - set(sys.stdlib_module_names) <= ALLOWED_THIRD_PARTY, sorted(others)


def test_the_import_closure_sees_function_level_imports():
    """The check above is only as good as its walk: it must find the imports fastload makes
    inside functions (torch, numpy, the per-GPU socket names)."""
    reached, others = import_closure(["autoscaler.agent.fastload"])
    assert {"torch", "numpy"} <= others
    assert "autoscaler.agent.preloaders" in reached
    _, controller_others = import_closure(["autoscaler.controller.settings"])
    assert controller_others - set(sys.stdlib_module_names), "a module with dependencies"
