"""What a dead run leaves behind, and how the next run repairs it (no Prefect here; the
flow's side is :mod:`flows.recovery`).

Stages write their outputs atomically: built in a hidden sibling folder, then renamed
into place. A process killed half-way leaves that folder (and, for a checkpoint or a
params file, a ``.tmp`` file) but never a half-written output; :func:`remove_leftovers`
deletes them, with the pipeline lock held so that no live run still uses them. A run's
MLflow runs, left RUNNING by a process that could not end them, end FAILED with the
reason through :func:`fail_run_tree`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.core.paths import ProjectPaths

log = logging.getLogger(__name__)

# folder (relative to the project root) -> the names of staging leftovers in it, as
# written by prepare (write_prepared), compress (compress_variants), evaluate (its
# staging folder and evaluation.old), the checkpoints, params.yaml overrides, the
# flow's own files in .slimflow/ and DVC copying into its cache.
LEFTOVERS: dict[str, tuple[str, ...]] = {
    "data": (".*.tmp-*", ".*.old-*"),
    "artifacts": (".*.tmp-*", ".*.old-*", ".*-build-*", ".*-scratch-*", ".*-old-*", ".*-staging-*", "evaluation.old"),
    "artifacts/checkpoints": ("*.tmp",),
    ".": ("params.yaml.tmp", "dvc.lock.tmp"),
    ".slimflow": ("*.error", "fit-job.json", ".pipeline.owner.*"),
    ".dvc/cache/files/md5": ("*/.*.tmp",),  # DVC's half-copied cache files
}


def find_leftovers(paths: ProjectPaths) -> list[Path]:
    found: list[Path] = []
    for folder, patterns in LEFTOVERS.items():
        base = paths.root / folder
        if base.is_dir():
            found += sorted({p for pattern in patterns for p in base.glob(pattern)})
    return found


def remove_leftovers(paths: ProjectPaths) -> list[Path]:
    """Delete the staging folders and temporary files dead runs left; returns them.

    Call it with the pipeline lock held: a live run's staging folders look the same.
    """
    removed = []
    for path in find_leftovers(paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
    return removed


def fail_run_tree(client: Any, run_id: str, reason: str) -> list[str]:
    """End ``run_id`` and every run nested under it that is still RUNNING as FAILED,
    with ``reason`` as their ``error`` tag; returns the ids changed.

    ``client`` is an ``mlflow.MlflowClient`` (of the store the dead run tracked to).
    """
    changed = []
    todo = [run_id]
    while todo:
        current = todo.pop()
        try:
            run = client.get_run(current)
        except Exception:  # deleted, or another store
            continue
        if run.info.status != "RUNNING" and current != run_id:
            continue  # a run that ended closed its own nested runs
        if run.info.status == "RUNNING":
            if "error" not in run.data.tags:
                client.set_tag(current, "error", reason[:5000])
            client.set_terminated(current, "FAILED")
            changed.append(current)
        children = client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{current}'", max_results=1000,
        )
        todo += [child.info.run_id for child in children]
    return changed
