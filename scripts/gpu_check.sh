#!/usr/bin/env bash
# slimflow's GPU proof in one call, on a fresh Linux host with NVIDIA GPUs and this
# project checked out (Python 3.11; PyPI reachable; no CUDA toolkit needed):
#
#   1. a venv of its own (.venv-gpu) with the CUDA build of torch 2.13.0 from PyPI;
#   2. CUDA's nvcc/headers and NCCL from their pip packages, Horovod 0.28.1 built with
#      NCCL (HOROVOD_GPU_OPERATIONS=NCCL) by the same steps as scripts/install.sh
#      (scripts/lib/horovod_build.sh), the wheel cached like the CPU one, keyed also by
#      the CUDA version and the GPUs' compute capabilities;
#   3. `horovodrun --check-build` (NCCL must be listed);
#   4. Horovod's allreduce over NCCL, one process per GPU (scripts/gpu_check.py allreduce);
#   5. the pipeline (`slimflow run`) in a temporary copy of the project, one Horovod worker
#      per GPU, bf16;
#   6. training throughput per GPU with 1 GPU and, where there are several, all of them
#      (scaling efficiency), and the GPUs' energy from NVML over each;
#   7. the trained baseline's inference latency on the GPU, timed as the evaluate stage
#      times models (fp32 and bf16), with NVML energy per 1,000 predictions.
#
# Every figure lands in one JSON file (default gpu_check.json); a summary is printed.
# Budget: 10 minutes on a 16-core host with one GPU, build included.
#
#   scripts/gpu_check.sh [--dry-run] [--offline BUNDLE] [--out FILE] [--venv DIR] [--epochs N] [--keep-work]
#
# --offline BUNDLE: on a host that reaches no package index but has Python with a CUDA
# torch, NCCL, nvcc and CMake of its own (this workplace's lent GPU machine; README "GPU
# check"): the venv is made over that Python and sees its packages (its torch, NCCL and
# CUDA), every other distribution the project needs comes from BUNDLE (what
# scripts/gpu_bundle.py makes: wheels.tar.xz and Horovod's sdist), the project is installed
# from the checkout, and Horovod comes from the bundle's wheel for this host's cache key
# where it carries one (gpu_bundle.py --horovod-wheel) that installs and loads here, else
# is built from the sdist. The base Python is $PYTHON, else python3. With --dry-run too,
# the same install runs on a host without a GPU (Horovod then built with NCCL as on a GPU
# host, for compute capability 9.0: a CUDA build of torch makes Horovod build its CUDA
# operations), then the dry run's steps.
#
# --dry-run (or SLIMFLOW_GPU_CHECK_DRY_RUN=1) alone needs no GPU and installs nothing: it
# reuses an installed venv (--venv, default .venv), computes the wheel's cache key and
# the build settings without building, and runs every other step on CPU with one process
# (Gloo): check-build, allreduce, prepare + a short training run + latency timing, the
# NVML reader (which reports why it cannot read), and the JSON report. tests/test_gpu_check.py runs it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

TORCH_VERSION=2.13.0
CMAKE_SPEC="cmake==3.31.10"  # CMake 4 rejects Horovod's (and Gloo's) cmake_minimum_required
DRY_RUN=${SLIMFLOW_GPU_CHECK_DRY_RUN:-0}
OFFLINE=""
OUT=gpu_check.json
VENV=""
EPOCHS=6
KEEP=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
log() { printf '[gpu-check] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a file"; OUT=$2; shift ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; VENV=$2; shift ;;
    --offline) [ $# -ge 2 ] || die "--offline needs the bundle's folder (scripts/gpu_bundle.py makes .gpu-bundle)"; OFFLINE=$2; shift ;;
    --epochs) [ $# -ge 2 ] || die "--epochs needs a number"; EPOCHS=$2; shift ;;
    --keep-work) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
case "$EPOCHS" in ''|*[!0-9]*|0|1) die "--epochs must be a whole number >= 2 (the first epoch is warm-up)" ;; esac
case "$DRY_RUN" in 1|true|yes) DRY_RUN=1 ;; *) DRY_RUN=0 ;; esac
case "$OUT" in /*) ;; *) OUT="$REPO/$OUT" ;; esac
if [ -n "$OFFLINE" ]; then
  case "$OFFLINE" in /*) ;; *) OFFLINE="$REPO/$OFFLINE" ;; esac
  for part in wheels.tar.xz manifest.json; do
    [ -f "$OFFLINE/$part" ] || die "--offline $OFFLINE: no $part there (make the bundle with scripts/gpu_bundle.py)"
  done
  ls "$OFFLINE"/horovod-*.tar.gz >/dev/null 2>&1 || die "--offline $OFFLINE: no horovod-*.tar.gz there (scripts/gpu_bundle.py)"
fi
if [ -z "$VENV" ]; then
  if [ "$DRY_RUN" = 1 ] && [ -z "$OFFLINE" ]; then VENV=.venv; else VENV=.venv-gpu; fi
fi
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac

# A host image without git (the project copy is then a DVC project without one): GitPython,
# which MLflow imports to read a run's commit, says so once instead of at every import.
command -v git >/dev/null || export GIT_PYTHON_REFRESH=quiet

WORK=${SLIMFLOW_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/slimflow-gpu-check.XXXXXX")}
mkdir -p "$WORK"
: > "$WORK/steps.tsv"
cleanup() { if [ "$KEEP" = 0 ] && [ -z "${SLIMFLOW_GPU_CHECK_WORK:-}" ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT
PY="$VENV/bin/python"
HELPER="$REPO/scripts/gpu_check.py"

now_ns() { date +%s%N; }
# seconds since START_NS, e.g. 12.34 (no bc on a bare host)
seconds_since() {
  local ns=$(( $(now_ns) - $1 ))
  printf '%d.%02d' $(( ns / 1000000000 )) $(( ns / 10000000 % 100 ))
}

# step NAME CMD...: run one step, timed, into steps.tsv; on failure write the report and stop.
# CMD runs in an `||` list, where `set -e` stops nothing: a function given here ends
# each command that may fail with `|| return 1`.
step() {
  local name=$1 started status=ok
  shift
  log "$name"
  started=$(now_ns)
  "$@" || status=failed
  printf '%s\t%s\t%s\n' "$name" "$status" "$(seconds_since "$started")" >> "$WORK/steps.tsv"
  if [ "$status" = failed ]; then
    log "step '$name' failed; figures so far in $OUT"
    report || true
    exit 1
  fi
}
skipped() { printf '%s\tskipped\t0\n' "$1" >> "$WORK/steps.tsv"; log "$1: skipped ($2)"; }
report() {
  local flag=()
  [ "$DRY_RUN" = 1 ] && flag=(--dry-run)
  [ -n "$OFFLINE" ] && flag+=(--offline "$OFFLINE")
  # Before the venv exists (a failed install), the base Python writes it (the helper's report needs only the standard library).
  local py=$PY
  [ -x "$py" ] || py=${PYTHON:-python3}
  "$py" "$HELPER" report --work "$WORK" --out "$OUT" "${flag[@]}"
}

# --- 0. the GPUs ---------------------------------------------------------------------------
NGPU=0
CC_LIST=""
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv,noheader > "$WORK/gpus.csv"
  NGPU=$(wc -l < "$WORK/gpus.csv")
  CC_LIST=$(cut -d, -f3 "$WORK/gpus.csv" | tr -d ' .' | sort -u | paste -sd, -)
fi
python3 - "$WORK/gpus.csv" "$WORK/gpus.json" <<'EOF'
import json, sys
from pathlib import Path
src, rows = Path(sys.argv[1]), []
if src.is_file():
    for line in src.read_text().splitlines():
        index, name, cc, memory, driver = (f.strip() for f in line.split(","))
        rows.append({"index": int(index), "name": name, "compute_capability": cc, "memory": memory, "driver": driver})
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2) + "\n")
EOF
log "GPUs: $NGPU (compute capabilities: ${CC_LIST:-none}); work folder $WORK"
if [ "$DRY_RUN" = 1 ] && [ -n "$OFFLINE" ]; then
  log "dry run, offline: the install from $OFFLINE into $VENV and Horovod's NCCL build; no GPU used"
  CC_LIST=${CC_LIST:-90}  # an H100/H200's
elif [ "$DRY_RUN" = 1 ]; then
  log "dry run: no GPU used, nothing installed or built (venv $VENV)"
  CC_LIST=${CC_LIST:-90}  # what the cache key would carry on an H100/H200
  [ -x "$PY" ] || die "dry run: $PY not found: it reuses an installed venv (make install, or --venv DIR)"
elif [ "$NGPU" = 0 ]; then
  die "no NVIDIA GPU found (nvidia-smi -L); use --dry-run to exercise the CPU-side steps"
fi

# --- 1-2. venv, CUDA torch, the project, Horovod with NCCL ----------------------------------
install_stack() {
  [ -x "$PY" ] || "${PYTHON:-python3.11}" -m venv "$VENV" || return 1
  local pip=("$PY" -m pip --disable-pip-version-check)
  # A find-links folder of CPU wheels (torch 2.13.0+cpu sorts above 2.13.0) must not win here.
  export PIP_FIND_LINKS=""
  "${pip[@]}" install -q --upgrade "pip>=24" "setuptools>=69,<81" wheel || return 1
  # PyPI's Linux torch 2.13.0 is the CUDA build (CUDA 13.0: cuda-toolkit, nvidia-nccl-cu13).
  "${pip[@]}" install -q "torch==$TORCH_VERSION" || return 1
  # nvcc, the CUDA headers and runtime of exactly torch's CUDA (its cuda-toolkit pin), NVML.
  local toolkit
  toolkit=$("$PY" - <<'EOF'
import importlib.metadata as m, re
for req in m.requires("torch") or []:
    if match := re.match(r"cuda-toolkit\[[^]]*\]\s*==\s*([\d.]+)", req):
        print(match.group(1)); break
else:
    raise SystemExit("torch has no cuda-toolkit requirement: not a CUDA 13 build from PyPI")
EOF
) || return 1
  "${pip[@]}" install -q "cuda-toolkit[cudart,nvcc,cccl]==$toolkit" nvidia-ml-py "$CMAKE_SPEC" || return 1
  "$PY" -c "import torch; assert torch.version.cuda and torch.cuda.is_available(), 'torch sees no CUDA GPU'" || return 1
  "${pip[@]}" install -q -e .
}

# The same from the host's own Python and a bundle (--offline): nothing fetched.
install_stack_offline() {
  local base=${PYTHON:-python3} pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  "$base" -c 'import sys, torch; print(f"base Python {sys.version.split()[0]} at {sys.executable}, torch {torch.__version__}, CUDA {torch.version.cuda}")' >&2 \
    || { log "$base has no torch: --offline builds on the host's own torch (set PYTHON)"; return 1; }
  if [ "$DRY_RUN" = 0 ]; then
    "$base" -c "import torch; assert torch.version.cuda and torch.cuda.is_available(), 'torch sees no CUDA GPU'" || return 1
  fi
  # The venv sees the host's packages through a .pth file: the image's python3 is itself a venv
  # (/opt/torch/.venv), and a venv made from a venv with --system-site-packages would see
  # the interpreter's own site-packages, not that venv's torch. Its own packages come first.
  if [ ! -x "$PY" ]; then
    # A host Python without ensurepip (Debian's python3-venv missing) makes it without pip;
    # the host's own pip then runs in it through the .pth file below and installs into it.
    if ! "$base" -m venv "$VENV" 2> "$WORK/venv.err"; then
      log "the host's Python made no venv with pip ($(tail -1 "$WORK/venv.err")): one without pip, the host's pip installs"
      rm -rf "$VENV"
      "$base" -m venv --without-pip "$VENV" || return 1
    fi
    local own
    own=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$base" - "$own/slimflow_host_packages.pth" <<'EOF' || return 1
import site, sys, sysconfig
paths = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
lines = ["# gpu_check.sh --offline: the host's own packages (torch, NCCL, CUDA), after the venv's"]
lines += [f"import site; site.addsitedir({p!r})" for p in paths]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
  fi
  mkdir -p "$WORK/bundle" || return 1
  # Python's tarfile, not tar: a host image may have no xz.
  "$base" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$OFFLINE/wheels.tar.xz" "$WORK/bundle" || return 1
  PIP_FIND_LINKS="" "${pip[@]}" install -q --no-index --no-deps --no-compile "$WORK"/bundle/wheels/*.whl || return 1
  rm -rf "$WORK/bundle"
  # The checkout, on the host's Python (pyproject.toml says 3.11; the image's is 3.12) and its torch.
  PIP_FIND_LINKS="" "${pip[@]}" install -q --no-index --no-deps --no-build-isolation --ignore-requires-python -e . || return 1
  "$PY" -c "import flows.cli, tasks.train, mlflow, prefect, dvc.repo" || return 1
}

# Build settings from the pip packages (links added where CMake looks), and the wheel's key.
horovod_settings() {
  local site exports
  # The site folder holding CUDA's and NCCL's pip packages: the venv's, or (--offline) the base Python's.
  site=$("$PY" -c 'import nvidia, os; print(os.path.dirname(sorted(nvidia.__path__)[0]))' 2>/dev/null) \
    || site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # (Where no pip package has nvcc, cuda-env takes the host's toolkit: the --offline image's.)
  exports=$("$PY" "$HELPER" cuda-env "$site") || return 1
  eval "$exports"
  export PATH="$SLIMFLOW_CUDA_BIN:$VENV/bin:$PATH"
  export LD_LIBRARY_PATH="$SLIMFLOW_CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export HOROVOD_BUILD_CUDA_CC_LIST="$CC_LIST"
  # The venv's CMake 3.31 (pip); --offline: the host's (set by build_horovod).
  [ -n "$OFFLINE" ] || export HOROVOD_CMAKE="$VENV/bin/cmake"
}

# shellcheck source=lib/horovod_build.sh
source "$REPO/scripts/lib/horovod_build.sh"
wheel_record() {  # the cache key and build settings, for the report (SOURCE: where the wheel came from, once known)
  local key=$1 source=${2:-}
  local built=1  # a dry run builds only offline (--offline --dry-run)
  [ "$DRY_RUN" = 1 ] && [ -z "$OFFLINE" ] && built=0
  "$PY" - "$WORK/wheel.json" "$key" "$(horovod_cache_root)/$key" "$built" "$source" <<'EOF'
import json, os, sys
from pathlib import Path
out, key, folder, built, source = sys.argv[1:]
keys = ("HOROVOD_GPU_OPERATIONS", "HOROVOD_CUDA_HOME", "HOROVOD_NCCL_HOME", "HOROVOD_NCCL_LINK",
        "HOROVOD_BUILD_CUDA_CC_LIST", "HOROVOD_CMAKE")
Path(out).write_text(json.dumps({"key": key, "folder": folder, "cached": any(Path(folder).glob("horovod-*.whl")),
    "built": built == "1", "source": source or None, "settings": {k: os.environ.get(k) for k in keys}},
    indent=2) + "\n")
EOF
}

horovod_loads_with_nccl() {
  "$PY" -c "import horovod.torch as h, sys; sys.exit(not h.nccl_built())" 2> "$WORK/horovod-import.err"
}

build_horovod() {
  local key torch_version=$TORCH_VERSION
  if [ -n "$OFFLINE" ]; then
    export HOROVOD_SDIST
    HOROVOD_SDIST=$(ls "$OFFLINE"/horovod-*.tar.gz | head -1)
    torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
    HOROVOD_CMAKE=$(command -v cmake) || { log "--offline: no cmake on PATH"; return 1; }
    export HOROVOD_CMAKE
    # CMake >= 4 refuses Horovod's (and Gloo's) cmake_minimum_required below 3.5 unless told.
    case "$("$HOROVOD_CMAKE" --version | head -1)" in *" version "[4-9].*) export CMAKE_POLICY_VERSION_MINIMUM=3.5 ;; esac
  fi
  horovod_settings || return 1
  key=$(horovod_wheel_key "$PY" "$torch_version" "-$SLIMFLOW_CUDA_TAG-sm${CC_LIST//,/-sm}")
  wheel_record "$key"
  if horovod_is_installed "$PY" && horovod_loads_with_nccl; then
    log "horovod with NCCL already installed in $VENV"
    wheel_record "$key" installed
    return 0
  fi
  local source=built cache
  cache="$(horovod_cache_root)/$key"
  # --offline: a wheel the bundle carries for this very key (gpu_bundle.py --horovod-wheel,
  # built on a copy of this image) is installed instead of building; one that does not
  # install or load here is dropped, and the sdist is built after all.
  if [ -n "$OFFLINE" ] && "$PY" "$HELPER" take-wheel "$OFFLINE/horovod-wheel" "$key" "$(horovod_cache_root)"; then
    log "the bundle's Horovod wheel for $key: not built here"
    if horovod_install "$PY" "$cache" 2> "$WORK/horovod-import.err" && horovod_loads_with_nccl; then
      wheel_record "$key" bundled
      return 0
    fi
    log "the bundle's Horovod wheel does not work here ($(tail -1 "$WORK/horovod-import.err")): building the sdist"
    rm -rf "$cache"
    "$PY" -m pip --disable-pip-version-check uninstall -q -y horovod 2>/dev/null || true
  elif ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
    source=cached
  fi
  horovod_install "$PY" "$cache" || return 1
  wheel_record "$key" "$source"
}

if [ -n "$OFFLINE" ]; then
  step install install_stack_offline
  step horovod-build build_horovod
elif [ "$DRY_RUN" = 1 ]; then
  skipped install "dry run: reusing $VENV"
  # The key a GPU build would use; the CUDA tag comes from pip's CUDA packages on a GPU host.
  step wheel-key wheel_record "$(horovod_wheel_key "$PY" "$TORCH_VERSION" "-cu130-sm${CC_LIST//,/-sm}")"
  horovod_is_installed "$PY" || log "note: $VENV's Horovod is not slimflow's patched build"
else
  step install install_stack
  step horovod-build build_horovod
fi
"$PY" - "$WORK/versions.json" <<'EOF'
import importlib.metadata as m, json, sys
import torch
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "horovod": version("horovod"),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None,
        "nvidia-ml-py": version("nvidia-ml-py"), "cuda-toolkit": version("cuda-toolkit")}
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF

# --- 3. horovodrun --check-build ------------------------------------------------------------
check_build() {
  "$VENV/bin/horovodrun" --check-build > "$WORK/check-build.txt"
  cat "$WORK/check-build.txt" >&2
  grep -q '\[X\] PyTorch' "$WORK/check-build.txt"
  if [ "$DRY_RUN" = 0 ]; then grep -q '\[X\] NCCL' "$WORK/check-build.txt"; fi
}
step check-build check_build

# --- 4. allreduce over NCCL (Gloo on CPU in the dry run) -------------------------------------
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  step allreduce "$PY" "$HELPER" allreduce --cpu --sizes-mb 0.004 4 --iterations 3 --out "$WORK/allreduce.json"
else
  step allreduce "$VENV/bin/horovodrun" -np "$NGPU" -H "localhost:$NGPU" \
    "$PY" "$HELPER" allreduce --out "$WORK/allreduce.json"
fi

# --- 5. the pipeline, in a temporary copy of the project --------------------------------------
COPY="$WORK/project"
make_copy() {
  mkdir -p "$COPY"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # What a fresh clone holds: tracked files and untracked ones git does not ignore.
    git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents -P {} "$COPY"/ 2>/dev/null || true
  else  # a checkout sent without its .git (a copy of the working tree): all of it but venvs, the bundle and run outputs
    tar -c --exclude='./.venv*' --exclude=./.gpu-bundle --exclude=./mlflow.db --exclude=./mlruns --exclude=./.prefect \
      --exclude=./.slimflow --exclude='*/__pycache__' --exclude='*.egg-info' -f - . | tar -x -C "$COPY" || return 1
  fi
  [ -f "$COPY/dvc.yaml" ] || return 1
  ln -s "$VENV" "$COPY/.venv"
  if command -v git >/dev/null; then
    (cd "$COPY" && rm -rf .dvc && git init -q && git add -A \
      && git -c user.email=gpu-check@slimflow.invalid -c user.name=gpu-check commit -qm gpu-check \
      && "$VENV/bin/dvc" init -q && "$VENV/bin/dvc" config core.analytics false)
  else  # a host image without git: DVC without a repository under it
    log "no git on this host: the project copy is a DVC project without git (dvc init --no-scm)"
    (cd "$COPY" && rm -rf .dvc && "$VENV/bin/dvc" init -q --no-scm && "$VENV/bin/dvc" config core.analytics false)
  fi
}
run_pipeline() {
  local started
  started=$(now_ns)
  (cd "$COPY" && PYTHONPATH="$COPY" "$VENV/bin/slimflow" run \
     --set "train.workers=$NGPU" --set train.mixed_precision=bf16 --set train.channels_last=auto)
  "$PY" - "$COPY" "$WORK/pipeline.json" "$(seconds_since "$started")" "$NGPU" <<'EOF'
import json, os, sys
from pathlib import Path
root, out, wall, workers = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
train = json.loads((root / "metrics/train.json").read_text())
evaluate = json.loads((root / "metrics/evaluate.json").read_text())
out.write_text(json.dumps({"wall_s": wall, "workers": workers, "precision": "bf16", "train": train,
    "fork_server": os.environ.get("SLIMFLOW_FORK_SERVER") != "off",
    "baseline": evaluate.get("baseline"), "models_evaluated": sorted(k for k, v in evaluate.items() if isinstance(v, dict))},
    indent=2) + "\n")
EOF
}
# The stage processes and workers are forks of the run's fork server (tasks/core/fork_server.py),
# never run on a GPU before this script: if the pipeline fails that way, it runs again without.
run_pipeline_either() {
  run_pipeline && return 0
  log "the pipeline failed with the fork server; again with SLIMFLOW_FORK_SERVER=off"
  SLIMFLOW_FORK_SERVER=off run_pipeline
}
step copy make_copy
export PYTHONPATH="$COPY"
if [ "$DRY_RUN" = 1 ]; then
  skipped pipeline "dry run: would run slimflow run --set train.workers=N --set train.mixed_precision=bf16"
  step prepare bash -c "cd '$COPY' && '$PY' -m tasks.prepare"
else
  step pipeline run_pipeline_either
fi

# --- 6. training throughput: 1 GPU, then every GPU ---------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  step throughput-1 "$PY" "$HELPER" throughput --project "$COPY" --workers 1 --epochs 2 \
    --work "$WORK" --out "$WORK/throughput-1.json"
else
  step throughput-1 "$PY" "$HELPER" throughput --project "$COPY" --workers 1 --epochs "$EPOCHS" \
    --precision bf16 --work "$WORK" --out "$WORK/throughput-1.json"
  if [ "$NGPU" -gt 1 ]; then
    step "throughput-$NGPU" "$PY" "$HELPER" throughput --project "$COPY" --workers "$NGPU" --epochs "$EPOCHS" \
      --precision bf16 --work "$WORK" --out "$WORK/throughput-$NGPU.json"
  fi
fi

# --- 7. inference latency of the trained baseline, and NVML ------------------------------------
MODEL="$COPY/artifacts/model"
[ -f "$MODEL/manifest.json" ] || MODEL="$WORK/fit-1/model"  # the dry run trains no pipeline
if [ "$DRY_RUN" = 1 ]; then
  step latency "$PY" "$HELPER" latency --model "$MODEL" --prepared "$COPY/data/prepared" --cpu --repeats 3 \
    --batch 64 --out "$WORK/latency.json"
else
  step latency "$PY" "$HELPER" latency --model "$MODEL" --prepared "$COPY/data/prepared" --out "$WORK/latency.json"
fi
step nvml "$PY" "$HELPER" nvml --out "$WORK/nvml.json"

report
