"""Peak inference memory: one probe process, one forked child per model.

Python allocation tracers miss what torch and ONNX Runtime allocate natively, so memory
is read from the kernel. One ``python -m tasks.evaluation.memory`` process imports torch,
ONNX Runtime and the loaders once and reads the test batch; then, for each model in
turn, it forks a child that starts from exactly that state. The child reads its resident
set, loads the model, reads it again, resets its peak (``echo 5 > /proc/self/clear_refs``
makes ``VmHWM`` count from the current resident set), makes one cold call at the large
batch and reports ``load_mb`` (resident rise of loading) and ``peak_mb`` (rise of the
peak over the loaded resident set). The first call is counted on purpose: arena and
workspace growth is memory inference needs. The parent never runs a model, so every
child starts from the same state and no model's allocations are seen by another.

Why the figures equal those of a fresh process per model (the earlier method, which
paid ~10 s of imports per model): a forked child shares its parent's pages, and sharing
does not change what the child's allocations add to its resident set. One difference
is undone explicitly: ``fork`` does not copy the page-table entries of file-backed
mappings (shared-library code), so a child would count again the library pages that
the parent's imports had already made resident. The parent records which of those pages
are resident (``/proc/self/pagemap``) and each child maps them back
(``MADV_POPULATE_READ``, Linux >= 5.14) before its first reading, so the child starts
as resident as a fresh process would be after the same imports. Where that is not
possible the method says ``vmhwm-delta-fork-unpopulated`` (figures then include some
library code pages); without ``clear_refs`` no peak is reported.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.paths import CODE_ROOT, code_on_path

log = logging.getLogger("slimflow.measure")

PROBE_MODULE = "tasks.evaluation.memory"
MADV_POPULATE_READ = 22  # linux/mman.h, Linux >= 5.14
_PAGE = os.sysconf("SC_PAGE_SIZE")
FAILED = {"load_mb": None, "peak_mb": None, "method": "failed"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux >= 4.0: reset the peak resident set to the current one
        return True
    except OSError:
        return False


# ------------------------------------------------------- resident file pages across fork
def resident_file_ranges() -> list[tuple[int, int]]:
    """``(start, length)`` runs of this process's resident pages in readable file-backed
    mappings (the pages ``fork`` leaves out of a child's page tables)."""
    ranges: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or fields[1][0] != "r":
                continue  # anonymous, [heap]/[stack]/[vdso], or unreadable
            start, end = (int(part, 16) for part in fields[0].split("-"))
            pagemap.seek(start // _PAGE * 8)
            entries = memoryview(pagemap.read((end - start) // _PAGE * 8)).cast("Q")
            run_start = None
            for index, entry in enumerate(entries):
                present = entry >> 63
                if present and run_start is None:
                    run_start = index
                elif not present and run_start is not None:
                    ranges.append((start + run_start * _PAGE, (index - run_start) * _PAGE))
                    run_start = None
            if run_start is not None:
                ranges.append((start + run_start * _PAGE, (len(entries) - run_start) * _PAGE))
    return ranges


def populate(ranges: Sequence[tuple[int, int]]) -> bool:
    """Map ``ranges`` into this process's page tables again (no copy: page-cache pages)."""
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    ok = True
    for start, length in ranges:
        if madvise(start, length, MADV_POPULATE_READ) != 0:
            ok = False  # EINVAL before Linux 5.14; a mapping may also have gone away
    return ok


# ------------------------------------------------------------------------ probe process
def _prepare_probe(prepared: Path, batch: int, threads: int) -> Any:
    """The parent's one-time state: runtimes imported, threads set, the batch in memory."""
    import torch

    from tasks.data import load_split
    from tasks.evaluation.timing import tile_to

    torch.set_num_threads(threads)
    # Import what loaders import lazily now, so its code is not counted as the model's.
    for module in ("onnxruntime", "tasks.evaluation.measure", "tasks.compression.loading",
                   "tasks.compression.formats", "tasks.compression.quantization"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    return tile_to(load_split(prepared, "test").x, batch)


def _child_measure(model_dir: Path, x: Any, threads: int, ranges: Sequence[tuple[int, int]] | None) -> dict[str, Any]:
    """In the forked child: resident memory of loading, and the peak of one cold call."""
    from tasks.evaluation.measure import load_for_measurement

    method = "vmhwm-delta-fork"
    if ranges is None or not populate(ranges):
        method = "vmhwm-delta-fork-unpopulated"
    gc.collect()
    before_load = _rss_bytes()
    loaded = load_for_measurement(model_dir, threads)
    gc.collect()
    loaded_rss = _rss_bytes()
    if not _reset_peak_rss():  # without a reset, the peak since start-up would be read
        return {"load_mb": max(0, loaded_rss - before_load) / 2**20, "peak_mb": None, "method": "unavailable"}
    loaded.predict(x)
    peak = _peak_rss_bytes()
    return {
        "load_mb": max(0, loaded_rss - before_load) / 2**20,
        "peak_mb": max(0, peak - loaded_rss) / 2**20,
        "method": method,
    }


def _fork_measure(model_dir: Path, x: Any, threads: int, ranges: Sequence[tuple[int, int]] | None,
                  timeout_s: float) -> dict[str, Any]:
    """:func:`_child_measure` in a child forked from this process; its JSON through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's exit handlers
        os.close(read_end)
        code = 0
        try:
            result = _child_measure(model_dir, x, threads, ranges)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which logs it
            result, code = {**FAILED, "error": f"{type(err).__name__}: {err}"[:500]}, 1
        try:
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                log.warning("%s: memory probe timed out after %.0f s", model_dir.name, timeout_s)
                return dict(FAILED)
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        log.warning("%s: memory probe died without a result", model_dir.name)
        return dict(FAILED)
    if result.get("error"):
        log.warning("%s: memory probe failed: %s", model_dir.name, result.pop("error"))
    return result


def memory_probe_many(
    model_dirs: Sequence[Path], prepared: Path, batch: int, threads: int, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """Run inside the probe process: one forked child per model, one at a time."""
    x = _prepare_probe(prepared, batch, threads)
    gc.collect()
    gc.freeze()  # the children's collections then leave the parent's objects alone
    try:
        ranges: list[tuple[int, int]] | None = resident_file_ranges()
    except OSError:
        ranges = None
    return [_fork_measure(folder, x, threads, ranges, timeout_s) for folder in model_dirs]


class MemoryProbe:
    """The probe process (``python -m tasks.evaluation.memory``), started: the caller goes on
    with other work while it runs on another core (it only reads the kernel's figures of its
    own children, which nothing else changes); :meth:`result` waits for it."""

    def __init__(self, model_dirs: Mapping[str, Path], prepared: Path, batch: int, threads: int,
                 timeout_s: float = 300.0) -> None:
        import tempfile

        self.names = list(model_dirs)
        self._deadline = time.monotonic() + 60 + timeout_s * len(self.names)
        self._process: subprocess.Popen[bytes] | None = None
        # Files, not pipes: the caller reads nothing until result(), and a full pipe would stall the probe.
        self._stdout, self._stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        if not self.names:
            return
        command = [
            sys.executable, "-m", PROBE_MODULE, str(prepared.resolve()),
            *(str(model_dirs[name].resolve()) for name in self.names),
            "--batch", str(batch), "--threads", str(threads), "--timeout", str(timeout_s),
        ]
        env = code_on_path(dict(os.environ))
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._stdout,
                                         stderr=self._stderr, env=env, cwd=CODE_ROOT)

    def result(self) -> dict[str, dict[str, Any]]:
        """Every model's memory figures; a failure gives ``method: failed``, never raises."""
        try:
            if self._process is None:
                return {}
            try:
                code = self._process.wait(timeout=max(self._deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                self.stop()
                log.warning("memory probe process timed out")
                return {name: dict(FAILED) for name in self.names}
            stdout, stderr = (self._read(handle) for handle in (self._stdout, self._stderr))
        finally:
            self._stdout.close()
            self._stderr.close()
        for line in stderr.strip().splitlines()[-20:]:
            log.info("memory probe: %s", line)
        if code != 0 or not stdout.strip():
            log.warning("memory probe process failed (exit %s)", code)
            return {name: dict(FAILED) for name in self.names}
        results = json.loads(stdout.strip().splitlines()[-1])
        return dict(zip(self.names, results, strict=True))

    def stop(self) -> None:
        """End the probe (the caller failed, or it ran past its time)."""
        from tasks.core.processes import stop_process

        if self._process is not None and self._process.poll() is None:
            stop_process(self._process, grace_s=2.0)

    @staticmethod
    def _read(handle: Any) -> str:
        handle.seek(0)
        return handle.read().decode(errors="replace")


def measure_memory_all(
    model_dirs: Mapping[str, Path], prepared: Path, batch: int, threads: int, timeout_s: float = 300.0
) -> dict[str, dict[str, Any]]:
    """Every model's memory figures from one fresh ``python -m tasks.evaluation.memory``
    process (see the module docstring); a failure gives ``method: failed``, never raises."""
    return MemoryProbe(model_dirs, prepared, batch, threads, timeout_s).result()


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.evaluation.memory PREPARED_DIR MODEL_DIR... --batch N --threads T``:
    a JSON list on stdout, one object per model in the order given."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {PROBE_MODULE}",
                                     description="peak inference memory of each model, as JSON")
    parser.add_argument("prepared", type=Path)
    parser.add_argument("model_dirs", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    results = memory_probe_many(args.model_dirs, args.prepared, args.batch, args.threads, args.timeout)
    sys.stdout.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    from tasks.core.processes import exit_process

    exit_process(main())
