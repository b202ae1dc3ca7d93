"""How a stage reports the one message that says why it failed.

A stage runs as a DVC command in its own process, and DVC only says that the command
exited non-zero. So a stage prints its message to stderr (for people and ``dvc repro``)
and also writes it into the run context's ``error_file`` when the flow set one, which lets
the flow fail its Prefect task and its MLflow run with the stage's own words.

A full disk is the failure most likely to hide behind another message (SQLite's
"database or disk is full", PyTorch's "file write failed"), and the one that can keep
that message from being written at all. :func:`disk_full_message` recognizes it anywhere
in an exception's chain; the flow preallocates the error file
(:func:`prepare_error_file`) so that a stage can still say so on a full disk.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

from tasks.core.run_context import RunContext

ERROR_FILE_BYTES = 4096  # preallocated: overwriting allocated blocks needs no free space
NO_SPACE = "no space left on device"
_SQLITE_FULL = "database or disk is full"
_TORCH_WRITE = re.compile(r"PytorchStreamWriter failed writing|file write failed|unexpected pos", re.IGNORECASE)


def report_stage_error(stage: str, message: str) -> None:
    """Print ``error: <stage>: <message>`` on stderr and hand it to the flow, if any."""
    line = f"{stage}: {message}"
    print(f"error: {line}", file=sys.stderr, flush=True)
    if path := RunContext.current().error_file:
        try:
            write_error_line(Path(path), line)
        except OSError:
            pass


def prepare_error_file(path: Path) -> None:
    """An empty error file with room for the stage's message, allocated now (best effort)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        with open(path, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, ERROR_FILE_BYTES)
    except (OSError, AttributeError):
        pass  # the file may stay empty; appending may still work


def write_error_line(path: Path, line: str) -> None:
    """Add ``line`` after what the file holds, inside its preallocated zeros when it has them."""
    data = line.encode() + b"\n"
    try:
        with open(path, "r+b") as handle:
            used = handle.read().split(b"\0", 1)[0]
            handle.seek(len(used))
            handle.write(data)
    except FileNotFoundError:
        with open(path, "ab") as handle:
            handle.write(data)


def read_error_file(path: Path) -> str:
    """What the stage wrote into ``path`` ("" if nothing)."""
    try:
        # Zeros are the unused preallocated room (a writer that appends lands after them).
        return path.read_bytes().replace(b"\0", b"").decode(errors="replace").strip()
    except OSError:
        return ""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]


def _sqlite_path() -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else None


def disk_full_message(err: BaseException, path: Path | str | None = None) -> str | None:
    """``"<path>: no space left on device"`` when ``err`` (or what caused it) is a full
    disk, else None. ``path`` names the place when the error itself does not."""
    for current in _chain(err):
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            where = current.filename or path
            return f"{where}: {NO_SPACE}" if where else f"{NO_SPACE} ({current})"
        text = str(current)
        if _SQLITE_FULL in text:
            where = _sqlite_path() or path or "the MLflow database"
            return f"{where}: {NO_SPACE} (SQLite: {_SQLITE_FULL})"
        if path is not None and _TORCH_WRITE.search(text) and _no_space(path):
            return f"{path}: {NO_SPACE}"
    return None


def _no_space(path: Path | str) -> bool:
    """Whether the filesystem of ``path`` (or its nearest existing parent) is (nearly) full."""
    import shutil

    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free < 1024 * 1024
    except OSError:
        return False


def _keep_traceback(stage: str, err: BaseException) -> str:
    """Write ``err``'s traceback to ``.slimflow/<stage>-traceback.log``; returns where (or "")."""
    import traceback

    from tasks.core.paths import find_project_root

    if os.environ.get("SLIMFLOW_DEBUG", "") not in ("", "0"):
        traceback.print_exception(err)
        return ""
    path = find_project_root() / ".slimflow" / f"{stage}-traceback.log"
    try:
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
    except OSError:
        return ""
    return f" (traceback: .slimflow/{path.name})"


def stage_main(stage: str, where: Callable[[], Path]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a stage entry's ``main``: an error it did not expect is one line too, and exit 1.

    A full disk anywhere becomes the path (``where()``, the folder the stage writes, when
    the error names none) and "no space left on device"; anything else its type and
    message, the traceback kept in ``.slimflow/<stage>-traceback.log`` (printed instead
    with ``SLIMFLOW_DEBUG=1``).
    """

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @wraps(main)
        def guarded(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except Exception as err:
                message = disk_full_message(err, where())
                if message is None:
                    text = " ".join(str(err).split())[:500] or "(no message)"
                    message = f"{type(err).__name__}: {text}{_keep_traceback(stage, err)}"
                report_stage_error(stage, message)
                return 1

        return guarded

    return decorate
