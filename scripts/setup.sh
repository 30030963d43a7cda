#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently, cached under .cache/ (git-ignored):
# a Python virtual environment with the project and its dev tools, Debian's prometheus, and every
# other real part through scripts/install-*.sh (CRIU's private root, the Kubernetes control plane).
# Re-running is quick: each step checks its stamp or its binary first.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${AUTOSCALER_CACHE:-$ROOT/.cache}
mkdir -p "$CACHE"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# 1. Python venv with the project (editable) and dev extras.
VENV=$CACHE/venv
STAMP=$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  log "python: creating $VENV and installing the project (first run takes a few minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  rm -f "$VENV"/.installed-*; touch "$STAMP"
else
  log "python: venv up to date"
fi

# 2. Debian packages the tests use (prometheus + promtool).
need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v nsenter >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
else
  log "apt: prometheus present"
fi

# 3. The other real parts, each with its own cached install script.
for s in "$ROOT"/scripts/install-*.sh; do
  [ -e "$s" ] || continue
  log "running $(basename "$s")"
  AUTOSCALER_CACHE=$CACHE bash "$s"
done
log "ready"
