"""Running the ``dvc.yaml`` stages from Python, one stage at a time, never two at once.

The flow executes the very stages ``dvc repro`` runs, so an unchanged stage is skipped
by both. DVC refuses a second concurrent ``repro`` in the same repository instead of
waiting, so every call here holds the project's pipeline lock (:mod:`tasks.core.lock`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

from tasks.core.errors import NO_SPACE, disk_full_message, prepare_error_file, read_error_file
from tasks.core.lock import PipelineBusy, pipeline_lock
from tasks.core.paths import find_project_root
from tasks.core.run_context import RunContext

__all__ = [  # PipelineBusy and pipeline_lock live in tasks.core.lock; importable from here too
    "PipelineBusy", "Reproduced", "StageFailed", "default_remote", "pipeline_lock", "pipeline_status", "push_outputs",
    "reproduce_stage", "restore_dvc_lock", "select_stages", "stage_environment", "stage_names",
]

log = logging.getLogger(__name__)


def stage_names(root: Path | None = None) -> tuple[str, ...]:
    """The pipeline's stages in the order ``dvc.yaml`` defines them: the one list of names."""
    import yaml

    path = (root or find_project_root()) / "dvc.yaml"
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the pipeline definition: {err}") from None
    return tuple(stages)


def select_stages(first: str | None, last: str | None, root: Path | None = None) -> list[str]:
    """The stages from ``first`` to ``last`` (inclusive; None: the ends), in pipeline order."""
    stages = stage_names(root)
    for name in (first, last):
        if name is not None and name not in stages:
            raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(stages)}")
    start = stages.index(first) if first else 0
    end = stages.index(last) if last else len(stages) - 1
    if start > end:
        raise ValueError(f"stage range {first}..{last} is empty: stages run in the order {', '.join(stages)}")
    return list(stages[start : end + 1])


class StageFailed(RuntimeError):
    """A stage's command failed; the message is the stage's own.

    ``exit_code`` 2 is the stages' convention for bad input (a bad data file, a bad
    parameter): retrying cannot help, unlike a crash (any other code).
    """

    BAD_INPUT = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def bad_input(self) -> bool:
        return self.exit_code == self.BAD_INPUT

    @property
    def retry_futile(self) -> bool:
        """Bad input, or a full disk: trying again fails the same way."""
        return self.bad_input or NO_SPACE in str(self)


def stage_environment() -> None:
    """Stage commands say ``python``: make it this interpreter (the project venv)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def _lock_backup(root: Path) -> Path:
    return root / ".slimflow" / "dvc.lock.backup"


def _guard_dvc_lock(root: Path) -> None:
    """Copy ``dvc.lock`` aside before a stage: DVC rewrites it in place, so a full disk or a
    kill while it writes leaves it truncated (measured: 4,096 of 4,483 bytes, then every
    DVC command fails on it)."""
    lock, backup = root / "dvc.lock", _lock_backup(root)
    try:
        if lock.exists():
            shutil.copyfile(lock, backup)
            return
    except OSError:
        pass
    backup.unlink(missing_ok=True)


def restore_dvc_lock(root: Path, only_if_broken: bool = False) -> bool:
    """Put back the ``dvc.lock`` of before the last stage if it changed (a failed stage) or,
    with ``only_if_broken``, if it no longer parses (a dead run); True if it did.

    A rename: it needs no free space."""
    import yaml

    lock, backup = root / "dvc.lock", _lock_backup(root)
    if not backup.exists():
        return False
    current = lock.read_bytes() if lock.exists() else b""
    if only_if_broken:
        try:
            broken = not isinstance(yaml.safe_load(current), dict)
        except yaml.YAMLError:
            broken = True
        restore = broken
    else:
        restore = current != backup.read_bytes()
    if restore:
        os.replace(backup, lock)
        log.warning("dvc.lock restored to what it was before the failed stage")
    else:
        backup.unlink(missing_ok=True)
    return restore


def _dvc_messages_once() -> None:
    """DVC's messages ("Running stage 'train':", "Updating lock file 'dvc.lock'", its
    warnings) printed once, by the handlers DVC gives its own logger on import, as ``dvc
    repro`` prints them. Passed on to the root logger as well, they came a second time in a
    flow run, from Prefect's console handler there."""
    dvc_log = logging.getLogger("dvc")
    dvc_log.propagate = not dvc_log.handlers  # without handlers of its own, the root's print them


class Reproduced(StrEnum):
    """What DVC did with a stage: ran its command, checked its outputs out of its cache
    instead (the same inputs ran before: DVC's run cache), or nothing (up to date)."""

    RAN = "ran"
    RESTORED = "restored"
    SKIPPED = "skipped"


def reproduce_stage(root: Path, stage: str, force: bool = False, context: RunContext | None = None) -> Reproduced:
    """Reproduce one stage (not its upstream): whether its command ran, DVC restored its
    outputs from its run cache, or it was up to date.

    The stage process gets ``context`` (with an error file added) as its run context.
    Raises :class:`StageFailed` with the stage's own error message when it fails; a
    ``dvc.lock`` that DVC changed (or truncated) on the way is put back as it was, and so
    are the stage's outputs (:class:`OutputsBefore`).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    stage_environment()
    _dvc_messages_once()
    error_file = root / ".slimflow" / f"{stage}.error"
    prepare_error_file(error_file)
    _guard_dvc_lock(root)
    before: OutputsBefore | None = None
    try:
        with (context or RunContext()).with_error_file(error_file).exported(), Repo(str(root)) as repo:
            before = OutputsBefore.keep(repo, root, stage)
            restored = _restores_noted(repo)
            ran = repo.reproduce(f"{root}/dvc.yaml:{stage}", single_item=True, force=force)
    except BaseException as err:  # a failure, or Ctrl-C / SIGTERM: what the stage was replacing comes back
        restore_dvc_lock(root)
        if before is not None:
            before.put_back(root)
        if not isinstance(err, (DvcException, OSError)):
            raise
        # The stage's own words first; then a full disk met by DVC itself (caching outputs).
        full = disk_full_message(err, root)
        reason = read_error_file(error_file) or (f"{stage}: {full}" if full else "")
        cause = err.__cause__ or err
        exited = re.search(r"exited with (-?\d+)", str(cause))
        raise StageFailed(reason or f"{stage}: {cause}", int(exited.group(1)) if exited else None) from None
    finally:
        error_file.unlink(missing_ok=True)
        if before is not None:
            before.discard()
    _lock_backup(root).unlink(missing_ok=True)
    if not ran:
        return Reproduced.SKIPPED
    return Reproduced.RESTORED if restored else Reproduced.RAN


def _restores_noted(repo: Any) -> list[str]:
    """The stages ``repo`` checks out of DVC's run cache instead of running their command
    (DVC says "Stage 'x' is cached - skipping run, checking out outputs"), as they happen.
    DVC's ``reproduce`` reports those among the stages it ran."""
    restored: list[str] = []
    restore = repo.stage_cache.restore

    def restore_noted(stage: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = restore(stage, *args, **kwargs)  # raises RunCacheNotFoundError when it holds no such run
        if not kwargs.get("dry"):
            restored.append(stage.addressing)
        return outcome

    repo.stage_cache.restore = restore_noted
    return restored


class OutputsBefore:
    """A stage's outputs as they were before DVC ran it, put back if it fails.

    DVC removes a stage's outputs before it runs the command (all but ``persist`` ones),
    so a stage that failed left none: the prepared data, the model or the metrics gone
    while ``dvc.lock`` still lists them, and ``dvc status`` calling them deleted. Cached
    outputs come back from DVC's cache (a checkout, as ``dvc.lock`` records them); the
    few uncached ones (metrics and plot files, kept in git) are hard-linked aside first
    (no new data: it works on a full disk, and DVC unlinks the path, so the link keeps
    the file as it was). Keeping them never fails a stage: what cannot be kept is not.
    """

    def __init__(self, cached: list[Path], kept: dict[Path, Path], folder: Path) -> None:
        self.cached, self.kept, self.folder = cached, kept, folder

    @classmethod
    def keep(cls, repo: Any, root: Path, stage: str) -> OutputsBefore:
        """The stage's outputs that are there now; its uncached ones linked under ``.slimflow/``."""
        folder = root / ".slimflow" / f"{stage}.outputs-before"
        shutil.rmtree(folder, ignore_errors=True)
        cached: list[Path] = []
        kept: dict[Path, Path] = {}
        # The repository's index: what reproduce reads next anyway (repo.stage.collect parsed dvc.yaml again).
        dvc_yaml = (root / "dvc.yaml").resolve()
        for found in repo.index.stages:
            if getattr(found, "name", None) != stage or Path(found.path).resolve() != dvc_yaml:
                continue
            for out in found.outs:
                path = Path(out.fs_path)
                if out.persist or not path.exists():
                    continue
                if out.use_cache:
                    cached.append(path)
                    continue
                copy = folder / path.relative_to(root)
                try:
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    if path.is_dir():
                        shutil.copytree(path, copy, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(path, copy)
                except OSError as err:
                    log.debug("%s: not kept to put back if %s fails: %s", path, stage, err)
                    continue
                kept[path] = copy
        return cls(cached, kept, folder)

    def put_back(self, root: Path) -> None:
        """After a failed stage (``dvc.lock`` as before it): every output as it was. Never raises."""
        from dvc.repo import Repo

        try:
            for path, copy in self.kept.items():
                _remove(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(copy, path)
            if self.cached:
                with Repo(str(root)) as repo:
                    repo.checkout(targets=[str(path) for path in self.cached], force=True)
        except Exception as err:  # the stage's own error is what the user must see
            log.warning("could not put back the outputs of before the failed stage: %s", err)
            return
        if self.kept or self.cached:
            log.info("the failed stage's outputs of before put back: %s",
                     ", ".join(str(p.relative_to(root)) for p in [*self.cached, *self.kept]))

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def pipeline_status(root: Path, stages: list[str] | None = None) -> dict[str, list]:
    """``dvc status`` (of ``stages``, or everything) as a dict: empty when up to date."""
    from dvc.repo import Repo

    targets = [f"{root}/dvc.yaml:{stage}" for stage in stages] if stages else None
    with Repo(str(root)) as repo:
        return repo.status(targets=targets)


def default_remote(root: Path) -> str | None:
    """The project's default DVC remote (``dvc remote add -d NAME URL``), or None."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote") or None


def push_outputs(root: Path, remote: str | None = None) -> int | None:
    """``dvc push --run-cache``: share the data and stage outputs with the team's remote.

    Pushes to ``remote`` or the project's default remote; returns the number of files
    uploaded, or None (nothing done) when the project has no remote: the embedded default
    keeps everything in the local cache. The run cache goes too, so a teammate's
    ``dvc repro --pull`` restores outputs of parameters seen here instead of re-running.
    Call it with the pipeline lock held (DVC refuses concurrent commands).
    """
    from dvc.repo import Repo

    _dvc_messages_once()
    with Repo(str(root)) as repo:
        name = remote or repo.config["core"].get("remote")
        if not name:
            return None
        pushed = repo.push(remote=name, run_cache=True)
    log.info("dvc push: %d file(s) to remote %r", pushed, name)
    return int(pushed)
