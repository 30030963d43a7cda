"""A real Kubernetes control plane on loopback, for tests and benchmarks.

Starts etcd, kube-apiserver (HTTPS, a static admin token, RBAC) and optionally kube-scheduler and
kube-controller-manager, all as child processes in a temporary folder. The binaries come from
`scripts/install-kube.sh` (v1.20.2 built from Debian's source package). No kubelet runs: GPU nodes
are plain Node objects (see `make_gpu_node`) and `autoscaler.cluster.fake_kubelet` plays the
kubelet for pods bound to them.

Why here and not in tests/: the benchmark needs the same control plane as the tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

ADMIN_TOKEN = "autoscaler-test-admin-token"
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_MODEL_LABEL = "nvidia.com/gpu.product"
ZONE_LABEL = "topology.kubernetes.io/zone"


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message holds the failing part's log tail."""


def kube_bin_dir() -> Path:
    """Where install-kube.sh put the binaries: $KUBE_BIN, else $AUTOSCALER_CACHE/kube/bin, else
    the repository's .cache/kube/bin."""
    if os.environ.get("KUBE_BIN"):
        return Path(os.environ["KUBE_BIN"])
    repo = Path(__file__).resolve().parents[2]
    cache = Path(os.environ.get("AUTOSCALER_CACHE", repo / ".cache"))
    return cache / "kube" / "bin"


def missing_parts(bin_dir: Path | None = None) -> list[str]:
    """The binaries the control plane needs that are not installed (empty when all are)."""
    bin_dir = bin_dir or kube_bin_dir()
    missing = [c for c in COMPONENTS if not (bin_dir / c).is_file()]
    missing += [t for t in ("etcd", "openssl") if shutil.which(t) is None]
    return missing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ControlPlane:
    """One running control plane. Use `start_control_plane()`; call `stop()` when done."""

    workdir: Path
    api_port: int
    etcd_port: int
    bin_dir: Path
    token: str = ADMIN_TOKEN
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    scheduler_healthz: str | None = None  # host:port of the scheduler's healthz, once started

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "certs" / "apiserver.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def configuration(self) -> client.Configuration:
        """A client configuration authenticated with the admin token."""
        cfg = client.Configuration(host=self.url)
        cfg.api_key = {"authorization": f"Bearer {self.token}"}
        cfg.ssl_ca_cert = str(self.ca_cert)
        return cfg

    def api_client(self) -> client.ApiClient:
        return client.ApiClient(self.configuration())

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def is_ready(self) -> bool:
        ctx = (
            ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert.exists() else None
        )
        if ctx is None:
            return False
        req = urllib.request.Request(
            f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def scheduler_healthy(self) -> bool:
        """Whether the scheduler answers on its healthz address (False: not started or not
        serving)."""
        if self.scheduler_healthz is None:
            return False
        try:
            url = f"http://{self.scheduler_healthz}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_scheduler_healthy(self, timeout: float = 60.0) -> None:
        """Block until the scheduler serves; its log in the error if it died or never did."""
        self._wait_until(self.scheduler_healthy, "kube-scheduler", "healthy", timeout)

    def _wait_until(self, check: Callable[[], bool], name: str, state: str,
                    timeout: float) -> None:  # fmt: skip
        """Poll `check` until true; a part that exited, or the deadline, is a
        ControlPlaneError with `name`'s log."""
        deadline = time.monotonic() + timeout
        while not check():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} not {state} after {timeout:.0f}s:\n"
                                        f"{self.log_tail(name)}")  # fmt: skip
            time.sleep(0.2)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                )

    def start_etcd(self) -> None:
        peer = free_port()
        self._spawn(
            "etcd",
            [
                "etcd", "--name", "test", "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"test=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync", "--quota-backend-bytes", str(2 * 1024**3),
                "--log-level", "warn",
            ],
        )  # fmt: skip

    def start_apiserver(self) -> None:
        d = self.workdir
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
                "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                "--secure-port", str(self.api_port), "--cert-dir", str(d / "certs"),
                "--token-auth-file", str(d / "tokens.csv"),
                "--authorization-mode", "RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", str(d / "sa.pub"),
                "--service-account-signing-key-file", str(d / "sa.key"),
                "--service-cluster-ip-range", "10.0.0.0/24",
                "--disable-admission-plugins", "ServiceAccount",
                "--allow-privileged=true",
                "--max-requests-inflight", "800",
                "--max-mutating-requests-inflight", "400",
            ],
        )  # fmt: skip

    def wait_ready(self, timeout: float = 90.0) -> None:
        self._wait_until(self.is_ready, "kube-apiserver", "ready", timeout)

    def start_scheduler(self, node_affinity_weight: int = 5) -> None:
        """kube-scheduler with a profile where preferred node affinity outweighs the default
        topology spreading (weight 2), so pods go to nodes holding their artifact when those
        have room; docs/controller.md recommends the same profile for real clusters."""
        config = self.workdir / "scheduler.yaml"
        # With --config, v1.20 ignores --port and binds its insecure healthz/metrics server to
        # the config's addresses, 0.0.0.0:10251 when unset: a second control plane's scheduler
        # on the machine could not bind it. A free loopback port for both keeps them apart.
        insecure = self.scheduler_healthz = f"127.0.0.1:{free_port()}"
        config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1beta1\n"
            "kind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {self.kubeconfig}\n"
            f"healthzBindAddress: {insecure}\nmetricsBindAddress: {insecure}\n"
            "leaderElection:\n  leaderElect: false\n"
            "profiles:\n- schedulerName: default-scheduler\n  plugins:\n    score:\n"
            "      disabled:\n      - name: NodeAffinity\n"
            f"      enabled:\n      - name: NodeAffinity\n        weight: {node_affinity_weight}\n"
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"), "--config", str(config),
                "--port=0", "--secure-port", str(free_port()), "--bind-address", "127.0.0.1",
            ],
        )  # fmt: skip

    def start_controller_manager(self) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                "--kubeconfig", str(self.kubeconfig), "--leader-elect=false",
                # No kubelet posts node status, so the node-lifecycle controller would taint and
                # evict everything; the fake kubelet owns node and pod status instead.
                "--controllers",
                "*,-nodelifecycle,-serviceaccount-token,-tokencleaner,-bootstrapsigner",
                "--port=0", "--secure-port", str(free_port()), "--bind-address", "127.0.0.1",
                "--concurrent-deployment-syncs", "10", "--concurrent-replicaset-syncs", "10",
                "--kube-api-qps", "200", "--kube-api-burst", "400",
            ],
        )  # fmt: skip

    def stop_process(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """Stop every part (newest first) and remove the working folder."""
        for name in reversed(list(self.processes)):
            self.stop_process(name)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _write_credentials(workdir: Path, token: str, api_port: int) -> None:
    (workdir / "certs").mkdir(parents=True)
    subprocess.run(
        ["openssl", "genrsa", "-out", str(workdir / "sa.key"), "2048"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "rsa", "-in", str(workdir / "sa.key"), "-pubout", "-out",
         str(workdir / "sa.pub")],
        check=True, capture_output=True,
    )  # fmt: skip
    (workdir / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    (workdir / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters:\n- name: local\n  cluster:\n"
        f"    server: https://127.0.0.1:{api_port}\n"
        f"    certificate-authority: {workdir / 'certs' / 'apiserver.crt'}\n"
        f"users:\n- name: admin\n  user:\n    token: {token}\n"
        "contexts:\n- name: local\n  context: {cluster: local, user: admin}\n"
        "current-context: local\n"
    )


def start_control_plane(
    *,
    scheduler: bool = True,
    controller_manager: bool = True,
    bin_dir: Path | None = None,
    timeout: float = 90.0,
) -> ControlPlane:
    """Start etcd + kube-apiserver (+ scheduler, controller-manager) and wait until ready."""
    bin_dir = bin_dir or kube_bin_dir()
    missing = missing_parts(bin_dir)
    if missing:
        raise ControlPlaneError(
            f"missing {', '.join(missing)} (looked in {bin_dir} and PATH); "
            "run scripts/install-kube.sh (or scripts/setup.sh)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="autoscaler-kcp-"))
    plane = ControlPlane(workdir=workdir, api_port=free_port(), etcd_port=free_port(),
                         bin_dir=bin_dir)  # fmt: skip
    try:
        _write_credentials(workdir, plane.token, plane.api_port)
        plane.start_etcd()
        plane.start_apiserver()
        plane.wait_ready(timeout)
        if scheduler:
            plane.start_scheduler()
        if controller_manager:
            plane.start_controller_manager()
        if scheduler:  # serving, not only started: a port it cannot bind fails here, named
            plane.wait_scheduler_healthy(timeout)
        time.sleep(0.1)
        plane._check_alive()
    except BaseException:
        plane.stop()
        raise
    return plane


def make_gpu_node(
    name: str,
    *,
    gpus: int = 8,
    gpu_model: str = "NVIDIA-H200",
    zone: str = "zone-a",
    address: str = "127.0.0.1",
    labels: dict[str, str] | None = None,
) -> client.V1Node:
    """A Node object as a GPU node's kubelet would register it (capacity, labels, address)."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: str(gpus)}
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        GPU_MODEL_LABEL: gpu_model,
        ZONE_LABEL: zone,
        **(labels or {}),
    }
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels=all_labels),
        status=client.V1NodeStatus(
            capacity=capacity,
            allocatable=dict(capacity),
            addresses=[client.V1NodeAddress(type="InternalIP", address=address)],
        ),
    )


def mark_node_ready(core: client.CoreV1Api, name: str) -> None:
    """Do what a kubelet's first status update does: Ready condition, no not-ready taint."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_node(name, {"spec": {"taints": None}})
    core.patch_node_status(
        name,
        {"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "FakeKubelet",
            "message": "test kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}},
    )  # fmt: skip


def register_gpu_nodes(core: client.CoreV1Api, nodes: list[client.V1Node]) -> None:
    """Create the nodes (status included, as a kubelet registers) and mark them Ready."""
    for node in nodes:
        created = core.create_node(node)
        # Some apiserver versions drop status on create; set it again through the subresource.
        if not created.status or not created.status.allocatable:
            core.patch_node_status(
                node.metadata.name,
                {"status": {"capacity": node.status.capacity,
                            "allocatable": node.status.allocatable,
                            "addresses": [{"type": a.type, "address": a.address}
                                          for a in node.status.addresses]}},
            )  # fmt: skip
        mark_node_ready(core, node.metadata.name)


@contextlib.contextmanager
def running_control_plane(**kwargs: object):
    """`with running_control_plane() as plane:` start, yield, always stop."""
    plane = start_control_plane(**kwargs)  # type: ignore[arg-type]
    try:
        yield plane
    finally:
        plane.stop()
