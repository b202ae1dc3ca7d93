# shellcheck shell=bash
# Building slimflow's Horovod wheel: sourced by scripts/install.sh (CPU: PyTorch + Gloo)
# and scripts/gpu_check.sh (GPU: + NCCL), so both apply the same fixes and cache alike.
#
# Horovod 0.28.1 as released asks CMake for C++14; PyTorch >= 2.1 headers need C++17
# (upstream horovod#3996, fixed on master by #3998, never released). slimflow's
# idle-cycle patch (scripts/horovod/idle-cycle.patch) adds HOROVOD_IDLE_CYCLE_TIME.
# The wheel's local version names the patch (tasks/training/launcher.py checks it).
# The caller sets `set -euo pipefail` and the HOROVOD_* build settings that differ
# (HOROVOD_GPU_OPERATIONS, HOROVOD_CUDA_HOME, HOROVOD_NCCL_*, HOROVOD_CMAKE...).

HOROVOD_VERSION=0.28.1
HOROVOD_PATCH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/horovod/idle-cycle.patch"

# Messages through the caller's log() when it has one.
_horovod_log() {
  if declare -F log >/dev/null; then log "$@"; else echo "$@"; fi
}

# A fixed sdist's top folder holds this file, saying which fixes (the local version label
# and HOROVOD_FIXES, the revision of horovod_fix_source below: raise it when that changes):
# scripts/gpu_bundle.py fixes the sdist it carries where patch and sed are at hand.
HOROVOD_FIXED_MARK=SLIMFLOW_FIXED
HOROVOD_FIXES=1

# horovod_fixed_mark: what HOROVOD_FIXED_MARK says of a source fixed by this very horovod_fix_source.
horovod_fixed_mark() {
  echo "$(horovod_local_version) fixes $HOROVOD_FIXES"
}

# The local version label: the patch's name and the first 8 hex digits of its sha256.
horovod_local_version() {
  echo "idlecycle.$(sha256sum "$HOROVOD_PATCH" | cut -c1-8)"
}

# Where built wheels are kept, outside the repository.
horovod_cache_root() {
  echo "${SLIMFLOW_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slimflow/wheels}"
}

# horovod_wheel_key PY TORCH_VERSION [SUFFIX]: the cache folder's name, keyed by Horovod
# and the patch, torch and PY's Python version; SUFFIX adds what else the build depends
# on (the GPU build: "-cu130-sm90", CUDA version and compute capabilities).
horovod_wheel_key() {
  local pyver
  pyver=$("$1" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
  echo "horovod-$HOROVOD_VERSION+$(horovod_local_version)-torch$2-$pyver${3:-}"
}

# horovod_is_installed PY: PY imports horovod.torch, and it is this patched build.
horovod_is_installed() {
  "$1" -c "import importlib.metadata as m, horovod.torch; assert m.version('horovod') == '$HOROVOD_VERSION+$(horovod_local_version)'" 2>/dev/null
}

# horovod_fix_source SRC: the C++17 fix and the idle-cycle patch, in an unpacked sdist.
horovod_fix_source() {
  local src=$1
  # torch >= 2.1 headers need C++17; horovod 0.28.1 asks for C++14 (upstream #3996/#3998).
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
  # The CUDA kernels (GPU builds only) ask nvcc for C++11; CUDA 13's headers need C++17.
  sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$src/horovod/common/ops/cuda/CMakeLists.txt"
  # slimflow's idle-cycle patch (HOROVOD_IDLE_CYCLE_TIME; see the patch's header).
  if command -v patch >/dev/null; then
    patch -s -p1 -d "$src" < "$HOROVOD_PATCH"
  else
    (cd "$src" && git apply -p1 "$HOROVOD_PATCH")  # outside a repository, git apply is plain patch
  fi
}

# horovod_prepare_source SRC: the fixes, unless SRC's mark says these very fixes are applied
# (the sdist scripts/gpu_bundle.py carries: then the host needs no patch, git or sed).
horovod_prepare_source() {
  local want mark
  want=$(horovod_fixed_mark)
  if [ ! -f "$1/$HOROVOD_FIXED_MARK" ]; then
    horovod_fix_source "$1"
  elif [ "$(cat "$1/$HOROVOD_FIXED_MARK")" = "$want" ]; then
    _horovod_log "the sdist's fixes are applied already ($HOROVOD_FIXED_MARK: $want)"
  else
    mark=$(cat "$1/$HOROVOD_FIXED_MARK")
    _horovod_log "error: the sdist was fixed by another slimflow ($HOROVOD_FIXED_MARK: $mark; this one: $want): make the bundle again (scripts/gpu_bundle.py)"
    return 1
  fi
}

# horovod_build_wheel PY WHEEL_DIR: download the sdist (or take $HOROVOD_SDIST), fix it, build one wheel with PY
# (torch already installed there) and the HOROVOD_* settings in the environment, and
# move it into WHEEL_DIR only when complete (a half-built wheel never lands in the cache).
# Runs in a subshell, so its clean-up trap is its own.
horovod_build_wheel() (
  local py=$1 wheel_dir=$2 build src cmake
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  if [ -n "${HOROVOD_SDIST:-}" ]; then  # a host with no package index (gpu_check.sh --offline)
    cp "$HOROVOD_SDIST" "$build/horovod-$HOROVOD_VERSION.tar.gz"
  else
    "$py" -m pip --disable-pip-version-check download -q --no-deps --no-binary :all: \
      "horovod==$HOROVOD_VERSION" -d "$build"
  fi
  tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
  src="$build/horovod-$HOROVOD_VERSION"
  horovod_prepare_source "$src"
  # No make on the host (a GPU image with CMake and ninja only): CMake's Ninja generator.
  if ! command -v make >/dev/null && command -v ninja >/dev/null; then export CMAKE_GENERATOR=Ninja; fi
  if [ "${CMAKE_GENERATOR:-}" = Ninja ]; then
    # setup.py hands `VERBOSE=1` to the build tool, which only make takes (ninja: "unknown
    # target 'VERBOSE=1'"); CMake's VERBOSE variable says the same to either.
    sed -i "s/make_args.append('VERBOSE=1')/os.environ.setdefault('VERBOSE', '1')/" "$src/setup.py"
    grep -q "os.environ.setdefault('VERBOSE', '1')" "$src/setup.py"
  fi
  cmake=${HOROVOD_CMAKE:-/usr/bin/cmake}
  if [ "$cmake" = /usr/bin/cmake ]; then
    # The system CMake (3.25): the cmake 4.x wheel rejects horovod's cmake_minimum_required.
    "$py" -m pip --disable-pip-version-check uninstall -q -y cmake 2>/dev/null || true
  fi
  mkdir -p "$build/wheel"
  PATH="/usr/bin:$PATH" \
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CMAKE="$cmake" \
  HOROVOD_LOCAL_VERSION="$(horovod_local_version)" \
  MAKEFLAGS="-j$(nproc)" \
    "$py" -m pip --disable-pip-version-check wheel -q --no-build-isolation --no-deps "$src" -w "$build/wheel"
  mkdir -p "$wheel_dir"
  mv "$build"/wheel/horovod-*.whl "$wheel_dir"/
)

# horovod_install PY WHEEL_DIR: build the wheel unless WHEEL_DIR has it, then install it into PY's venv.
horovod_install() {
  local py=$1 wheel_dir=$2
  if ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    _horovod_log "reusing cached horovod wheel from $wheel_dir"
  else
    _horovod_log "building horovod $HOROVOD_VERSION wheel (a few minutes on 2 cores) -> $wheel_dir"
    horovod_build_wheel "$py" "$wheel_dir"
  fi
  "$py" -m pip --disable-pip-version-check install -q --no-deps "$wheel_dir"/horovod-*.whl
}
