#!/usr/bin/env bash
# Installs a real Kubernetes control plane for the tests: kube-apiserver, kube-controller-manager
# and kube-scheduler v1.20.2 built from Debian bookworm's `kubernetes` SOURCE package (the whole
# upstream tree with its vendored dependencies), plus Debian's etcd-server and openssl.
#
# Why from source: no registry ships these binaries; Debian's source package builds with Debian's
# Go and needs only deb.debian.org. The build takes ~4 minutes on 2 cores and ~1.4 GB of memory.
# The binaries are cached in $AUTOSCALER_CACHE/kube/bin (default .cache/kube/bin); the source tree
# is removed after a successful build.
#
# Idempotent: exits early when the three binaries exist and report v1.20.2.
# Env: AUTOSCALER_CACHE (cache dir), KUBE_KEEP_SOURCE=1 keeps the build tree.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${AUTOSCALER_CACHE:-$REPO/.cache}
DEST=$CACHE/kube
BIN=$DEST/bin
VERSION=v1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler)
log() { printf '\033[1m[install-kube]\033[0m %s\n' "$*" >&2; }

apt_install() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v openssl >/dev/null || missing+=(openssl)
  if [ "${1:-}" = build ]; then
    command -v go >/dev/null || missing+=(golang-go)
    command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
    command -v rsync >/dev/null || missing+=(rsync)
    command -v make >/dev/null || missing+=(make)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

built_ok() {
  local c
  for c in "${COMPONENTS[@]}"; do
    [ -x "$BIN/$c" ] || return 1
    "$BIN/$c" --version 2>/dev/null | grep -q "$VERSION" || return 1
  done
}

if built_ok; then
  apt_install
  log "cached at $BIN ($("$BIN/kube-apiserver" --version)); etcd $(etcd --version | head -1 | awk '{print $3}')"
  exit 0
fi

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { log "needs $tool (Debian/Ubuntu)"; exit 1; }
done
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$KEYRING" ] || { log "needs $KEYRING (package debian-archive-keyring)"; exit 1; }
apt_install build

mkdir -p "$DEST"
WORK=$(mktemp -d "$DEST/.build.XXXXXX")
if [ "${KUBE_KEEP_SOURCE:-0}" != 1 ]; then
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/parts" "$WORK/lists/partial" "$WORK/src" "$WORK/home"
# A private apt configuration with a deb-src line: the system's apt state is left alone.
cat > "$WORK/parts/kube-src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: $KEYRING
SRC
APT=(-o APT::Sandbox::User=root -o Dir::Etc::SourceList=/dev/null
  -o "Dir::Etc::SourceParts=$WORK/parts" -o "Dir::State::Lists=$WORK/lists")
log "fetching the bookworm source index (private apt state under $WORK)"
apt-get "${APT[@]}" update -qq
log "downloading the kubernetes=$DEB_VERSION source package"
(cd "$WORK/src" && apt-get "${APT[@]}" source --download-only "kubernetes=$DEB_VERSION" >/dev/null)
(cd "$WORK/src" && dpkg-source -x "kubernetes_${DEB_VERSION}.dsc" tree >/dev/null)

# k8s 1.20 builds in GOPATH mode and generates its OpenAPI code first, so a bare `go build`
# fails; its Makefile does both.
log "building ${COMPONENTS[*]} $VERSION (about 4 minutes on 2 cores)"
WHAT=""
for c in "${COMPONENTS[@]}"; do WHAT="$WHAT cmd/$c"; done
(cd "$WORK/src/tree" && HOME=$WORK/home KUBE_GIT_VERSION=$VERSION KUBE_GIT_MAJOR=1 \
  KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean CGO_ENABLED=0 \
  make WHAT="${WHAT# }" GOLDFLAGS="-s -w" >"$WORK/build.log" 2>&1) || {
  log "build failed; last lines of the log:"; tail -30 "$WORK/build.log" >&2; exit 1; }

mkdir -p "$BIN.new"
for c in "${COMPONENTS[@]}"; do
  cp "$WORK/src/tree/_output/bin/$c" "$BIN.new/$c"
done
rm -rf "$BIN"
mv "$BIN.new" "$BIN"
built_ok || { log "built binaries do not report $VERSION"; exit 1; }
log "installed ${COMPONENTS[*]} at $BIN ($(du -sh "$BIN" | cut -f1))"
