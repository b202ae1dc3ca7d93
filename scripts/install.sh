#!/usr/bin/env bash
# Installs slimflow into ./.venv: the pinned stack from pyproject.toml, then Horovod
# 0.28.1 built from source with PyTorch + Gloo (C++17 fix, and slimflow's idle-cycle
# patch: scripts/horovod/idle-cycle.patch) into a wheel cached outside the repository,
# keyed by Horovod, the patch, torch and Python versions, so reinstalls reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=2.13.0

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

# The shared build steps: C++17 fix, idle-cycle patch, wheel cache (scripts/lib/horovod_build.sh).
# shellcheck source=lib/horovod_build.sh
source scripts/lib/horovod_build.sh
WHEEL_DIR="$(horovod_cache_root)/$(horovod_wheel_key "$PY" "$TORCH_VERSION")"

if horovod_is_installed "$PY"; then
  log "horovod $HOROVOD_VERSION+$(horovod_local_version) already installed"
else
  horovod_install "$PY" "$WHEEL_DIR"
fi

"$VENV/bin/horovodrun" --check-build | sed 's/^/[install] /'
# An empty, migrated Prefect database (a server started on it once: block types registered):
# a project's first server starts from a copy of it in about 4.4 s instead of migrating a new
# one (9 s) during the first `make run` (flows/prefect_database.py).
"$PY" -m flows.prefect_database --write-database-template | sed 's/^/[install] /' \
  || log "no Prefect database template: a project's first Prefect server migrates its own"
# The same for MLflow: a new project's store starts from a copy with its tables made
# (MLflow creates them one migration at a time: 1-2 s of the first run; tasks/core/tracking.py).
"$PY" -m tasks.core.tracking --write-store-template | sed 's/^/[install] /' \
  || log "no MLflow store template: a project's first run creates MLflow's tables itself"
touch "$VENV/.slimflow-installed"
log "done"
