"""A pod's init for tests: PID 1 of fresh namespaces made by `unshare`, as a pod sandbox is.

It brings the loopback interface up, bind-mounts the pod's volumes (host dir -> container path,
inside the pod's own mount namespace, as a kubelet mounts an emptyDir), optionally starts one
command as a session leader (stdio opened here, inside the namespace, so no descriptor points
into the host's mounts), and reaps every child forever, so a dead or failed restore never leaves
a zombie holding a PID. Before starting the command it moves the namespace's next PID to
--first-pid, so the worker's PID is not one the restore tools themselves (nsenter, criu) take in
a fresh namespace.

    unshare -p -m -n -i -u --fork --mount-proc python -m autoscaler.testing.pod_init \
        [--first-pid N] [--ready-file F] [--bind HOST:CONTAINER]... [-- CMD...]
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
MS_BIND = 4096
MS_REC = 16384


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def bind_mount(source: str, target: str) -> None:
    """Bind `source` onto `target` in this (private) mount namespace only."""
    os.makedirs(target, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount {source} -> {target}: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    first_pid = 0
    ready_file = None
    binds: list[tuple[str, str]] = []
    while argv[:1] in (["--first-pid"], ["--ready-file"], ["--bind"]):
        if argv[0] == "--first-pid":
            first_pid = int(argv[1])
        elif argv[0] == "--bind":
            source, _, target = argv[1].partition(":")
            binds.append((source, target))
        else:
            ready_file = argv[1]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    loopback_up()
    for source, target in binds:
        bind_mount(source, target)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(str(os.getpid()))
    if argv:
        if first_pid:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(first_pid - 1))
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
