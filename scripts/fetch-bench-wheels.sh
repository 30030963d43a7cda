#!/usr/bin/env bash
# Wheels the restore benchmark needs on a GPU machine whose Python lacks them and which cannot
# reach a package index: downloaded here into .cache/wheels (git-ignored), carried there with
# the repository, and unpacked by benchmarks/restore/run.sh into .cache/bench-pylib.
# Today that is only blake3 (the agent's default artifact digest), for CPython 3.10-3.13 on
# x86_64 and aarch64 Linux.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/.cache/wheels
PY=${PYTHON:-$ROOT/.cache/venv/bin/python}
mkdir -p "$DEST"
for py in 3.10 3.11 3.12 3.13; do
  for platform in manylinux2014_x86_64 manylinux2014_aarch64; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      --platform "$platform" -d "$DEST" "blake3>=1.0,<2" 2>/dev/null \
      || echo "no blake3 wheel for CPython $py on $platform" >&2
  done
done
ls -1 "$DEST"
