#!/usr/bin/env bash
# Installs CRIU 4.2.x from Debian sid, with the libraries it needs, into a private root
# ($AUTOSCALER_CACHE/criu-root, default .cache/criu-root) without touching the system's packages.
#
# Why: bookworm's CRIU 3.17 fails on kernel 6.18 (vDSO bounds), trixie's 4.1 cannot dump a TCP
# socket on kernels >= 6.16; 4.2.1 works but needs glibc >= 2.38, so it runs through the private
# root's own dynamic loader. The result is `criu-root/bin/criu`, a relocatable wrapper (it finds
# the root relative to itself), so the folder can be copied to a GPU machine without registries.
#
# Idempotent: skips the download when the wrapper exists and `criu check` passes.
# Env: AUTOSCALER_CACHE (cache dir), CRIU_SUITE (Debian suite, default sid),
#      CRIU_MIN_VERSION (default 4.2).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${AUTOSCALER_CACHE:-$REPO/.cache}
DEST=$CACHE/criu-root
SUITE=${CRIU_SUITE:-sid}
MIN_VERSION=${CRIU_MIN_VERSION:-4.2}
WRAPPER=$DEST/bin/criu
log() { printf '\033[1m[install-criu]\033[0m %s\n' "$*" >&2; }

# The packages CRIU 4.2 and its libraries need from sid (measured in shared/lab/get-criu.sh).
PACKAGES=(criu libcompel1 libnet9 libc6 libgnutls30t64 libnftables1 libnl-3-200 libprotobuf-c1
  libbsd0 libuuid1 libmd0 libnettle8t64 libhogweed6t64 libgmp10 libunistring5 libidn2-0
  libp11-kit0 libtasn1-6 libffi8 libjansson4 libmnl0 libnftnl11 libxtables12 libedit2 libtinfo6
  libgcc-s1 libbpf1 libelf1t64 zlib1g libzstd1 libcap2)

# `criu check` needs root (it probes kernel features); without root only the version is checked.
verify() {
  local criu=$1 version
  version=$("$criu" --version 2>/dev/null | sed -n 's/^Version: *//p')
  if [ -z "$version" ]; then
    log "CRIU at $criu does not run"
    return 1
  fi
  if [ "$(printf '%s\n%s\n' "$MIN_VERSION" "$version" | sort -V | head -1)" != "$MIN_VERSION" ]; then
    log "CRIU $version is older than $MIN_VERSION (it cannot dump TCP sockets on this kernel)"
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "CRIU $version runs; not root, so 'criu check' was skipped"
    return 0
  fi
  local out
  if ! out=$("$criu" check 2>&1); then
    log "'criu check' failed for CRIU $version:"
    printf '%s\n' "$out" | tail -5 >&2
    return 1
  fi
  log "CRIU $version: $(printf '%s\n' "$out" | tail -1)"
}

write_wrapper() {
  local root=$1
  mkdir -p "$root/bin"
  cat > "$root/bin/criu" <<'WRAP'
#!/bin/sh
# Runs the private root's CRIU through the root's own dynamic loader (CRIU needs glibc >= 2.38).
R=$(cd "$(dirname "$0")/.." && pwd)
exec "$R/usr/lib64/ld-linux-x86-64.so.2" --library-path "$R/usr/lib/x86_64-linux-gnu" \
  "$R/usr/sbin/criu" "$@"
WRAP
  chmod 0755 "$root/bin/criu"
}

if [ -x "$WRAPPER" ] && verify "$WRAPPER"; then
  log "cached at $DEST"
  exit 0
fi

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { log "needs $tool (Debian/Ubuntu)"; exit 1; }
done
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$KEYRING" ] || { log "needs $KEYRING (package debian-archive-keyring)"; exit 1; }

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.criu-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/parts" "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/debs" "$WORK/root"
# A private apt configuration: only the sid suite, its own lists, nothing of the system's state
# changes (no sources, no lists, no installed packages).
cat > "$WORK/parts/criu-sid.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: $KEYRING
SRC
APT=(-o APT::Sandbox::User=root -o Dir::Etc::SourceList=/dev/null
  -o "Dir::Etc::SourceParts=$WORK/parts" -o "Dir::State::Lists=$WORK/lists"
  -o "Dir::Cache::Archives=$WORK/archives" -o "Dir::Etc::Preferences=/dev/null"
  -o "Dir::Etc::PreferencesParts=$WORK/parts")
log "fetching the package lists of Debian $SUITE (private apt state under $WORK)"
apt-get "${APT[@]}" update -qq
log "downloading ${#PACKAGES[@]} packages"
(cd "$WORK/debs" && apt-get "${APT[@]}" -t "$SUITE" download "${PACKAGES[@]}" >/dev/null)
for deb in "$WORK"/debs/*.deb; do
  dpkg-deb -x "$deb" "$WORK/root"
done
# Record what was installed, for the artifact manifests and for debugging.
for deb in "$WORK"/debs/*.deb; do
  dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"
done | sort > "$WORK/root/PACKAGES"
write_wrapper "$WORK/root"
verify "$WORK/root/bin/criu"
# Swap into place only once verified: a failed or interrupted install leaves the old root (or none).
rm -rf "$DEST.old"
[ -e "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$WORK/root" "$DEST"
rm -rf "$DEST.old"
log "installed at $DEST ($(du -sh "$DEST" | cut -f1)); run $WRAPPER"
