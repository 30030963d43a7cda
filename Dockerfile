# Images of the GPU inference autoscaler, from one Dockerfile (always name the target: without
# --target, docker builds the last stage, which is not the controller):
#   docker build --target controller -t ghcr.io/gpu-autoscaler/autoscaler:0.1.0 .  (controller, KEDA scaler, CLI)
#   docker build --target agent -t ghcr.io/gpu-autoscaler/autoscaler-agent:0.1.0 . (node agent)
#   docker build --target preloader -t ghcr.io/gpu-autoscaler/autoscaler-preloader:0.1.0 .
#                                                                      (node weight preloader)
# The agent image adds CRIU 4.2.x, which Debian stable does not ship in a version that works on
# current kernels: run `bash scripts/install-criu.sh` first (on a Debian/Ubuntu host, as root, so
# `criu check` verifies it); it leaves a relocatable private root in .cache/criu-root that the
# agent stage copies. The preloader image is a CUDA PyTorch runtime plus the autoscaler package
# alone: its code needs only the standard library, torch and numpy (which the base image has).
# See docs/deploy.md.

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

# The node's weight preloader: loads a restored worker's weights onto the GPU while CRIU
# restores it (autoscaler/agent/fastload.py). It imports only the standard library, torch and
# numpy, so it takes the package's source as is, without `pip install .` and the controller's
# dependency set (pandas, scikit-learn, ...). Runs as root in a privileged pod (docs/deploy.md).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS preloader
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/opt/autoscaler
COPY autoscaler /opt/autoscaler/autoscaler
# Fails the build if the base image's Python is older than the package's (3.11) or the imports
# pull in something the image lacks (torch itself is imported when the preloader starts).
RUN python -c "import sys; assert sys.version_info >= (3, 11), sys.version" \
    && python -c "import autoscaler.agent.fastload, autoscaler.agent.preloaders, autoscaler.agent.cuda, torch, numpy"
ENTRYPOINT ["python", "-m", "autoscaler.agent.fastload"]
CMD ["preload", "--socket-dir", "/run/autoscaler/preload", "--socket-mode", "0666"]
