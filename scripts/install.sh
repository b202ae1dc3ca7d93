#!/usr/bin/env bash
# Installs slimflow into ./.venv: the pinned stack from pyproject.toml, then Horovod
# 0.28.1 built from source with PyTorch + Gloo (C++17 fix, and slimflow's idle-cycle
# patch: scripts/horovod/idle-cycle.patch) into a wheel cached outside the repository,
# keyed by Horovod, the patch, torch and Python versions, so reinstalls reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
CACHE_ROOT=${SLIMFLOW_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slimflow/wheels}

log() { printf '[install] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

"${PIP[@]}" install -q --upgrade "pip>=24" "setuptools>=69,<81" wheel
# torch first, pinned: this is the CPU wheel on local disk; anything looser pulls CUDA.
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
log "installing slimflow and its pinned dependencies"
"${PIP[@]}" install -q -e ".[dev]"

PYVER=$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
PATCH="$PWD/scripts/horovod/idle-cycle.patch"
PATCH_ID=$(sha256sum "$PATCH" | cut -c1-8)
# The wheel's version says which patch it carries (tasks/training/launcher.py checks it too).
LOCAL_VERSION="idlecycle.$PATCH_ID"
KEY="horovod-$HOROVOD_VERSION+$LOCAL_VERSION-torch$TORCH_VERSION-$PYVER"
WHEEL_DIR="$CACHE_ROOT/$KEY"

if "$PY" -c "import importlib.metadata as m, horovod.torch; assert m.version('horovod') == '$HOROVOD_VERSION+$LOCAL_VERSION'" 2>/dev/null; then
  log "horovod $HOROVOD_VERSION+$LOCAL_VERSION already installed"
else
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod $HOROVOD_VERSION wheel (about 12 minutes on 2 cores) -> $WHEEL_DIR"
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/horovod-"$HOROVOD_VERSION".tar.gz -C "$BUILD"
    SRC="$BUILD/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers need C++17; horovod 0.28.1 asks for C++14 (upstream #3996/#3998).
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/horovod/torch/CMakeLists.txt"
    # slimflow's idle-cycle patch (HOROVOD_IDLE_CYCLE_TIME; see the patch's header).
    if command -v patch >/dev/null; then
      patch -s -p1 -d "$SRC" < "$PATCH"
    else
      (cd "$SRC" && git apply -p1 "$PATCH")  # outside a repository, git apply is plain patch
    fi
    # The system CMake (3.25): the cmake 4.x wheel rejects horovod's cmake_minimum_required.
    "${PIP[@]}" uninstall -q -y cmake 2>/dev/null || true
    mkdir -p "$BUILD/wheel"
    PATH="/usr/bin:$PATH" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CMAKE=/usr/bin/cmake \
    HOROVOD_LOCAL_VERSION="$LOCAL_VERSION" \
    MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel -q --no-build-isolation --no-deps "$SRC" -w "$BUILD/wheel"
    mkdir -p "$WHEEL_DIR"
    # Atomic publish: a half-built wheel never lands in the cache.
    mv "$BUILD"/wheel/horovod-*.whl "$WHEEL_DIR"/
  else
    log "reusing cached horovod wheel from $WHEEL_DIR"
  fi
  "${PIP[@]}" install -q --no-deps "$WHEEL_DIR"/horovod-*.whl
fi

"$VENV/bin/horovodrun" --check-build | sed 's/^/[install] /'
touch "$VENV/.slimflow-installed"
log "done"
