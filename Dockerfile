# Images of the GPU inference autoscaler, from one Dockerfile:
#   docker build -t ghcr.io/gpu-autoscaler/autoscaler:0.1.0 .                      (controller, KEDA scaler, CLI)
#   docker build --target agent -t ghcr.io/gpu-autoscaler/autoscaler-agent:0.1.0 . (node agent)
# The agent image adds CRIU 4.2.x, which Debian stable does not ship in a version that works on
# current kernels: run `bash scripts/install-criu.sh` first (on a Debian/Ubuntu host, as root, so
# `criu check` verifies it); it leaves a relocatable private root in .cache/criu-root that the
# agent stage copies. See docs/deploy.md.

FROM python:3.11-slim AS controller
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY autoscaler ./autoscaler
RUN pip install . && rm -rf /src
# The shipped default forecaster and its model card (loaded with sha256 and version checks).
COPY models/default /opt/autoscaler/models/default
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent autoscaler
USER 10001:10001
WORKDIR /
ENTRYPOINT ["autoscaler"]
CMD ["--help"]

FROM controller AS agent
USER 0:0
# nsenter/unshare (util-linux) enter a pod's namespaces for a restore; CRIU runs through its own
# dynamic loader from the private root.
RUN apt-get update && apt-get install -y --no-install-recommends util-linux procps \
    && rm -rf /var/lib/apt/lists/*
COPY .cache/criu-root /opt/criu-root
ENV AUTOSCALER_CRIU=/opt/criu-root/bin/criu
RUN /opt/criu-root/bin/criu --version
# The agent runs as root in a privileged pod (CRIU and the CUDA checkpoint API need it).
# Its own entry point loads only the agent's code (idle RSS 37 MB against 161 MB for the full
# CLI: benchmarks/results/agent-idle.json).
ENTRYPOINT ["python", "-m", "autoscaler.agent"]
CMD ["serve"]
