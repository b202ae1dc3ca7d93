"""The Python half of scripts/gpu_check.sh: each step that needs Python, as a sub-command.

    python scripts/gpu_check.py cuda-env SITE_PACKAGES [--cuda-home DIR]   # shell exports for the NCCL build
    horovodrun -np N python scripts/gpu_check.py allreduce --out F [--cpu]
    python scripts/gpu_check.py throughput --project DIR --workers N --out F [--epochs E]
    python scripts/gpu_check.py latency --model DIR --prepared DIR --out F
    python scripts/gpu_check.py nvml --out F                # the NVML reader alone
    python scripts/gpu_check.py report --out gpu_check.json --work DIR [--dry-run]

Every figure lands in one JSON file (``report``). Each step runs on CPU too (Gloo, no
NVML), which is how ``gpu_check.sh --dry-run`` and tests/test_gpu_check.py exercise it on
a machine without a GPU; what a figure was measured on is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 600.0  # the whole check, build included, on a 16-core host with one GPU


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


# --- NVML ---------------------------------------------------------------------------------

class NvmlReader:
    """GPU energy counters through NVML (nvidia-ml-py), or the reason they cannot be read.

    ``nvmlDeviceGetTotalEnergyConsumption`` is millijoules since the driver loaded, on
    Volta and newer; a GPU without it is listed with ``energy_supported: false``.
    """

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self.gpus: list[dict[str, Any]] = []
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as err:  # no driver, no GPU, no permission
            self.reason = f"NVML unavailable: {err}"
            return
        self._nvml = pynvml
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                supported = True
            except Exception:
                supported = False
            self.gpus.append({"index": index, "name": name.decode() if isinstance(name, bytes) else name,
                              "energy_supported": supported})
            if supported:
                self._handles.append(handle)
        self.available = bool(self._handles)
        if not self.available:
            self.reason = "no GPU with an energy counter (needs Volta or newer)" if self.gpus else "no GPU"

    def energy_j(self) -> float | None:
        """Total energy of every GPU with a counter, in joules (None when unavailable)."""
        if not self.available:
            return None
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3

    def describe(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason or None, "gpus": self.gpus}


class EnergyWindow:
    """Joules used by the GPUs between entering and leaving (None without NVML)."""

    def __init__(self, reader: NvmlReader) -> None:
        self.reader = reader
        self.joules: float | None = None
        self.seconds = 0.0

    def __enter__(self) -> EnergyWindow:
        self._start_j = self.reader.energy_j()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start
        end = self.reader.energy_j()
        if self._start_j is not None and end is not None:
            self.joules = end - self._start_j

    def figures(self) -> dict[str, Any]:
        watts = self.joules / self.seconds if self.joules is not None and self.seconds else None
        return {"energy_j": self.joules, "seconds": self.seconds, "mean_power_w": watts}


# --- CUDA from pip packages ---------------------------------------------------------------

def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative), unless ``link`` already exists."""
    if link.exists() or link.is_symlink():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def system_cuda_home() -> Path:
    """Where a CUDA toolkit installed outside pip would be: ``CUDA_HOME``, /usr/local/cuda
    if it holds nvcc, the folder above the ``nvcc`` on ``PATH`` (through its links), else
    /usr/local/cuda."""
    if home := os.environ.get("CUDA_HOME"):
        return Path(home)
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").is_file():
        return default
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else default


def cuda_env(site_packages: Path, system_home: Path | None = None) -> dict[str, str]:
    """The build settings for Horovod's NCCL operations, from CUDA's and NCCL's pip packages.

    Assumptions (from the wheels' layouts, CUDA 13 as torch 2.13.0 on PyPI pins it:
    ``cuda-toolkit==13.0.3``, ``nvidia-nccl-cu13==2.29.7``): the CUDA 13 packages
    (nvidia-cuda-runtime, -nvcc, -crt, -cccl, nvidia-nvvm) share one tree,
    ``nvidia/cu13/{bin,include,include/cccl,lib,nvvm}``, with ``libcudart.so.13`` and
    ``libcudart_static.a`` but no unversioned ``libcudart.so``; NCCL lies in
    ``nvidia/nccl/{include,lib}`` with only ``libnccl.so.2``. CMake's FindCUDAToolkit and
    Horovod's FindNCCL look for the unversioned names, and nvcc's profile for a
    ``targets/x86_64-linux`` folder, so those are added as links inside the packages.

    Where no pip package holds nvcc, a CUDA toolkit installed the usual way (``system_home``,
    e.g. /usr/local/cuda: ``bin/nvcc``, ``include``, ``lib64``) is used as it is, with
    NCCL still from the pip package (a host image with torch's CUDA from pip and the
    toolkit from NVIDIA's installer: ``gpu_check.sh --offline``).
    """
    nvidia = site_packages / "nvidia"
    homes = sorted(p.parent.parent for p in nvidia.glob("*/bin/nvcc"))
    if homes:
        home = homes[-1]  # e.g. nvidia/cu13
        lib = home / "lib"
        cudart = sorted(lib.glob("libcudart.so.*"))
        if not cudart or not (home / "include" / "cuda_runtime.h").is_file():
            raise SystemExit(f"{home}: no CUDA runtime (libcudart, cuda_runtime.h); install cuda-toolkit[cudart]")
        _link(cudart[0], lib / "libcudart.so")
        _link(lib, home / "lib64")
        _link(home / "include", home / "targets" / "x86_64-linux" / "include")
        _link(lib, home / "targets" / "x86_64-linux" / "lib")
    elif system_home is not None and (system_home / "bin" / "nvcc").is_file():
        home, lib = system_home, system_home / "lib64"
        if not (home / "include" / "cuda_runtime.h").is_file() or not any(lib.glob("libcudart.so*")):
            raise SystemExit(f"{home}: no CUDA runtime (lib64/libcudart.so, include/cuda_runtime.h)")
    else:
        where = f" nor {system_home}/bin" if system_home is not None else ""
        raise SystemExit(f"no nvcc under {nvidia}/*/bin{where}: install cuda-toolkit[nvcc] matching torch's CUDA")
    nccl = nvidia / "nccl"
    libnccl = sorted((nccl / "lib").glob("libnccl.so.*"))
    if not libnccl or not (nccl / "include" / "nccl.h").is_file():
        raise SystemExit(f"{nccl}: no NCCL (libnccl.so.N, nccl.h); install torch's nvidia-nccl package")
    _link(libnccl[0], nccl / "lib" / "libnccl.so")
    version = _cuda_version(home)
    return {
        "CUDA_HOME": str(home),  # torch.utils.cpp_extension.CUDA_HOME: Horovod's FindPytorch asks it
        "HOROVOD_CUDA_HOME": str(home),
        "HOROVOD_GPU_OPERATIONS": "NCCL",
        "HOROVOD_NCCL_HOME": str(nccl),
        "HOROVOD_NCCL_INCLUDE": str(nccl / "include"),
        "HOROVOD_NCCL_LIB": str(nccl / "lib"),
        "HOROVOD_NCCL_LINK": "SHARED",  # the pip package has no libnccl_static.a
        "SLIMFLOW_CUDA_TAG": "cu" + version.replace(".", ""),
        "SLIMFLOW_CUDA_LIBS": f"{lib}:{nccl / 'lib'}",
        "SLIMFLOW_CUDA_BIN": str(home / "bin"),
    }


def take_bundled_wheel(bundled: Path, key: str, cache_root: Path) -> Path | None:
    """The Horovod wheel a bundle carries for ``key`` (``bundled/<key>/horovod-*.whl``:
    ``gpu_bundle.py --horovod-wheel``) copied into the wheel cache's folder of ``key``, where
    the build takes a cached wheel instead of building; None (nothing copied) when the bundle
    has none for this host's key (another torch, CUDA, GPU or patch) or one is cached already.
    The copy lands under its own name only when complete."""
    wheels = sorted((bundled / key).glob("horovod-*.whl"))
    target = cache_root / key
    if not wheels or any(target.glob("horovod-*.whl")):
        return None
    target.mkdir(parents=True, exist_ok=True)
    partial = target / (wheels[0].name + ".partial")
    shutil.copyfile(wheels[0], partial)
    return partial.replace(target / wheels[0].name)


def _cuda_version(home: Path) -> str:
    """``13.0`` from the runtime header's CUDART_VERSION (13000)."""
    for line in (home / "include" / "cuda_runtime_api.h").read_text(errors="replace").splitlines():
        if line.startswith("#define CUDART_VERSION"):
            code = int(line.split()[2])
            return f"{code // 1000}.{code % 1000 // 10}"
    raise SystemExit(f"{home}/include/cuda_runtime_api.h: no CUDART_VERSION")


# --- allreduce ----------------------------------------------------------------------------

def allreduce(out: Path, cpu: bool, sizes_mb: list[float], iterations: int) -> dict[str, Any]:
    """Horovod's allreduce of float32 tensors on every rank: correctness, then time and bandwidth.

    Bus bandwidth is the NCCL-tests convention: algorithm bandwidth x 2 (n - 1) / n.
    """
    import horovod.torch as hvd
    import torch

    hvd.init()
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(hvd.local_rank())  # Horovod: one GPU per local rank
    device = torch.device("cuda", hvd.local_rank()) if use_cuda else torch.device("cpu")
    size, rank = hvd.size(), hvd.rank()
    results = []
    for mb in sizes_mb:
        count = max(1, int(mb * 2**20 / 4))
        tensor = torch.full((count,), float(rank + 1), device=device)
        reduced = hvd.allreduce(tensor, op=hvd.Sum, name=f"check.{mb}")
        expected = size * (size + 1) / 2
        correct = bool(torch.allclose(reduced, torch.full_like(reduced, expected)))
        for _ in range(2):  # warm-up: NCCL communicators, allocator
            hvd.allreduce(tensor, op=hvd.Sum, name=f"warm.{mb}")
        if use_cuda:
            torch.cuda.synchronize()
        hvd.barrier()
        start = time.perf_counter()
        for i in range(iterations):
            hvd.allreduce(tensor, op=hvd.Sum, name=f"time.{mb}.{i}")
        if use_cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iterations
        algbw = count * 4 / seconds / 1e9
        results.append({"size_mb": mb, "correct": correct, "seconds": seconds, "algbw_gb_s": algbw,
                        "busbw_gb_s": algbw * 2 * (size - 1) / size if size > 1 else None})
    result = {
        "world_size": size, "device": str(device.type), "nccl_built": bool(hvd.nccl_built()),
        "gloo_built": bool(hvd.gloo_built()), "gpu_operations": "NCCL" if use_cuda and hvd.nccl_built() else None,
        "all_correct": all(r["correct"] for r in results), "sizes": results,
    }
    if rank == 0:
        write_json(out, result)
    hvd.shutdown()
    return result


# --- training throughput (the project's Horovod loop, launched the project's way) ----------

def throughput(project: Path, workers: int, epochs: int, out: Path, precision: str, work: Path) -> dict[str, Any]:
    """Train the baseline with ``workers`` processes (one per GPU) and report samples/s per worker.

    The job is the train stage's own (``tasks.train.fit_job``: params.yaml's model, batch
    size and learning rate), with ``epochs`` and ``mixed_precision`` set here; it runs
    through the project's launcher (``horovodrun`` for more than one worker). The first
    epoch (allocator, cuDNN autotuning) is left out of the median.
    """
    sys.path.insert(0, str(project))  # the copy's code, whatever PYTHONPATH says
    from dataclasses import replace

    from tasks.core.config import load_params
    from tasks.core.paths import ProjectPaths
    from tasks.train import fit_job
    from tasks.training import launch_fit

    paths = ProjectPaths(project)
    params = load_params(paths.params)
    folder = work / f"fit-{workers}"
    job = replace(
        fit_job(params, paths, None), epochs=epochs, patience=epochs, mixed_precision=precision,
        output=str(folder / "model"), checkpoints=str(folder / "checkpoints"),
        metrics_path=str(folder / "train.json"), history_path=str(folder / "history.json"),
        fault_after_epoch=None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    # The workers run the copy's code too (they inherit this environment).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))
    reader = NvmlReader()
    started = time.perf_counter()
    with EnergyWindow(reader) as energy:
        launch_fit(job, params.train.model_copy(update={"workers": workers, "hosts": None}), project)
    wall = time.perf_counter() - started
    history = json.loads((folder / "history.json").read_text())
    steady = [h["samples_per_s"] for h in history[1:]] or [h["samples_per_s"] for h in history]
    total = statistics.median(steady)  # global samples/s: every worker's samples
    samples = int(round(sum(h["samples_per_s"] * h["epoch_time_s"] for h in history)))  # every epoch's samples
    result = {
        "workers": workers, "epochs": len(history), "precision": precision,
        "samples_per_s_total": total, "samples_per_s_per_worker": total / workers,
        "epoch_time_s_median": statistics.median(h["epoch_time_s"] for h in history[1:] or history),
        "wall_s": wall, "samples_trained": samples, "model": str(folder / "model"),
        "final_val_accuracy": history[-1]["val_accuracy"], "nvml": reader.describe(), **energy.figures(),
    }
    if result["energy_j"] is not None and samples:
        result["energy_j_per_1k_samples_incl_launch"] = 1000 * result["energy_j"] / samples
    write_json(out, result)
    return result


# --- inference latency, timed as the evaluate stage times it -------------------------------

def latency(model_dir: Path, prepared: Path, out: Path, cpu: bool, repeats: int, batch: int) -> dict[str, Any]:
    """The evaluate stage's timing (tasks.evaluation.timing: interleaved rounds, batch-1
    latency p50/p95, large-batch throughput, energy windows at batch 1 and the large batch) of the trained
    baseline on the GPU, fp32 and bf16 autocast. The evaluate stage itself measures on CPU.
    The project's code comes from ``PYTHONPATH`` (gpu_check.sh points it at the copy)."""
    import numpy as np
    import torch

    from tasks.core.model_files import load_eager_model
    from tasks.data import load_preprocessing, load_split
    from tasks.core.energy import EnergyMeter
    from tasks.evaluation.timing import tile_to, time_models

    device = torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")
    model = load_eager_model(model_dir).to(device).eval()
    test = load_split(prepared, "test", load_preprocessing(prepared))

    def predictor(bf16: bool) -> Any:
        def predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(torch.from_numpy(x).to(device, non_blocking=True)).float().cpu().numpy()
        return predict

    predictors = {"fp32": predictor(False), "bf16-autocast": predictor(True)}
    meter = EnergyMeter(gpu_index=torch.cuda.current_device() if device.type == "cuda" else None)
    timings = time_models(predictors, x_single=test.x[:64], x_batch=tile_to(test.x, batch),
                          repeats=repeats, warmup=10, meter=meter)
    accuracy = {name: float((predict(test.x).argmax(1) == test.y).mean()) for name, predict in predictors.items()}
    result = {
        "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "energy_source": meter.source, "throughput_batch": batch, "repeats": repeats,
        "models": {name: {**t.summary(), "accuracy": accuracy[name]} for name, t in timings.items()},
    }
    write_json(out, result)
    return result


# --- the report -----------------------------------------------------------------------------

def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def report(work: Path, out: Path, dry_run: bool, offline: Path | None = None) -> dict[str, Any]:
    """Every step's figures from ``work`` in one JSON file, and a summary on stdout (``offline``:
    the bundle installed from, whose manifest says what it carried)."""
    steps = []
    steps_file = work / "steps.tsv"
    if steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps.append({"step": name, "status": status, "seconds": float(seconds)})
    total = sum(s["seconds"] for s in steps)
    one = _read(work / "throughput-1.json")
    many = sorted(work.glob("throughput-[0-9]*.json"), key=lambda p: int(p.stem.split("-")[1]))
    many_result = _read(many[-1]) if many and many[-1].name != "throughput-1.json" else None
    scaling = None
    if one and many_result:
        scaling = {"workers": many_result["workers"],
                   "efficiency": many_result["samples_per_s_per_worker"] / one["samples_per_s_per_worker"]}
    check_build = work / "check-build.txt"
    result = {
        "dry_run": dry_run,
        "offline": _offline_summary(offline) if offline else None,
        "host": {"hostname": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "gpus": _read(work / "gpus.json") or []},
        "versions": _read(work / "versions.json"),
        "wheel": _read(work / "wheel.json"),
        "steps": steps, "total_s": total, "budget_s": BUDGET_S, "within_budget": total <= BUDGET_S,
        "ok": bool(steps) and all(s["status"] in ("ok", "skipped") for s in steps),
        "horovod_check_build": check_build.read_text() if check_build.is_file() else None,
        "allreduce": _read(work / "allreduce.json"),
        "pipeline": _read(work / "pipeline.json"),
        "throughput_1": one, "throughput_n": many_result, "scaling": scaling,
        "latency": _read(work / "latency.json"),
        "nvml": _read(work / "nvml.json"),
    }
    write_json(out, result)
    _print_summary(result, out)
    return result


def _offline_summary(bundle: Path) -> dict[str, Any]:
    manifest = _read(bundle / "manifest.json") or {}
    return {"bundle": str(bundle), "wheels": len(manifest.get("wheels", [])), "bundle_bytes": manifest.get("bundle_bytes"),
            "horovod_sdist": manifest.get("horovod_sdist"), "horovod_wheel": manifest.get("horovod_wheel")}


def _print_summary(r: dict[str, Any], out: Path) -> None:
    def fmt(value: Any, unit: str = "", digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    mode = {(True, False): " (dry run: CPU, nothing installed)", (True, True): " (dry run, offline: installed from "
            "the bundle, Horovod with NCCL; CPU)", (False, True): " (offline: installed from the bundle)"}
    print(f"slimflow GPU check{mode.get((r['dry_run'], bool(r.get('offline'))), '')}: "
          f"{'OK' if r['ok'] else 'FAILED'} in {r['total_s']:.0f} s (budget {r['budget_s']:.0f} s)")
    for s in r["steps"]:
        print(f"  {s['step']:<14} {s['status']:<8} {s['seconds']:7.1f} s")
    if (wheel := r.get("wheel") or {}).get("source"):
        said = {"bundled": "the bundle's wheel, not built here", "built": "built here", "cached": "the cached wheel",
                "installed": "installed already"}
        print(f"horovod: {said.get(wheel['source'], wheel['source'])} ({wheel['key']})")
    if a := r["allreduce"]:
        big = a["sizes"][-1]
        print(f"allreduce: {a['world_size']} rank(s) on {a['device']} ({a['gpu_operations'] or 'Gloo'}), "
              f"correct={a['all_correct']}, {big['size_mb']:g} MB: {fmt(big['algbw_gb_s'], ' GB/s', 2)} "
              f"(bus {fmt(big['busbw_gb_s'], ' GB/s', 2)})")
    for key in ("throughput_1", "throughput_n"):
        if t := r[key]:
            print(f"training, {t['workers']} worker(s), {t['precision']}: {t['samples_per_s_per_worker']:.0f} "
                  f"samples/s per worker; GPU energy {fmt(t['energy_j'], ' J')} over {t['wall_s']:.1f} s")
    if s := r["scaling"]:
        print(f"scaling efficiency, {s['workers']} GPUs vs 1: {100 * s['efficiency']:.0f}%")
    if lat := r["latency"]:
        for name, m in lat["models"].items():
            print(f"inference on {lat['device']} ({name}): p50 {m['latency_p50_ms']:.3f} ms, p95 "
                  f"{m['latency_p95_ms']:.3f} ms at batch 1; {m['throughput_sps']:.0f} samples/s at batch "
                  f"{lat['throughput_batch']}; {fmt(m['energy_per_1k_j'], ' J', 3)} per 1k ({lat['energy_source']})")
    if n := r["nvml"]:
        print(f"NVML: {'available' if n['available'] else 'unavailable: ' + str(n['reason'])}")
    print(f"figures: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cuda-env", help="shell exports for building Horovod with NCCL from pip's CUDA")
    p.add_argument("site_packages", type=Path)
    p.add_argument("--cuda-home", type=Path, help="a CUDA toolkit outside pip (bin/nvcc), used where no pip package "
                   "has nvcc (default: CUDA_HOME, /usr/local/cuda, or the nvcc on PATH)")
    p = sub.add_parser("take-wheel", help="the bundle's Horovod wheel for this key into the wheel cache "
                       "(exit 1: none for this key, or one cached already)")
    p.add_argument("bundled", type=Path, help="the bundle's horovod-wheel folder")
    p.add_argument("key")
    p.add_argument("cache_root", type=Path)
    p = sub.add_parser("allreduce", help="Horovod allreduce: correctness and bandwidth (run under horovodrun)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true", help="CPU tensors (Gloo) even where a GPU exists")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[0.004, 4.0, 256.0])
    p.add_argument("--iterations", type=int, default=10)
    p = sub.add_parser("throughput", help="train the baseline on N workers, samples/s per worker")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--precision", choices=["auto", "off", "bf16"], default="auto")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("latency", help="the evaluate stage's timing of the baseline on the GPU")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p = sub.add_parser("nvml", help="what NVML reports (or why it cannot)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report", help="every step's figures in one JSON file")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--offline", type=Path, help="the bundle the stack was installed from (gpu_check.sh --offline)")
    args = parser.parse_args(argv)

    if args.command == "cuda-env":
        for key, value in cuda_env(args.site_packages, args.cuda_home or system_cuda_home()).items():
            print(f"export {key}={value}")
    elif args.command == "take-wheel":
        return 0 if take_bundled_wheel(args.bundled, args.key, args.cache_root) else 1
    elif args.command == "allreduce":
        allreduce(args.out, args.cpu, args.sizes_mb, args.iterations)
    elif args.command == "throughput":
        throughput(args.project.resolve(), args.workers, args.epochs, args.out, args.precision, args.work)
    elif args.command == "latency":
        latency(args.model.resolve(), args.prepared.resolve(), args.out, args.cpu, args.repeats, args.batch)
    elif args.command == "nvml":
        reader = NvmlReader()
        write_json(args.out, {**reader.describe(), "energy_j": reader.energy_j()})
    elif args.command == "report":
        report(args.work, args.out, args.dry_run, args.offline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
