"""Stale runs repaired on the next start.

A pipeline run writes a *run record* (``.slimflow/runs/<flow run id>.json``) when it
starts: its process (pid + start time, host, the token of its process tree), its Prefect
flow run and, once opened, its MLflow run and tracking store. A run that ends normally
removes it. A record whose process is gone therefore names a run that died without
ending its states (``kill -9``, out of memory, a stopped ``slimflow serve``), and
:func:`repair_stale_runs` ends them: the MLflow pipeline run and every run nested under
it that is still RUNNING become FAILED, the Prefect flow run CRASHED, each with the
reason. Every flow run does it after taking the pipeline lock (with the staging folders
the dead run left, :func:`repair_after_crash`); ``slimflow serve`` does it when stopped,
``slimflow status`` for the MLflow part.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tasks.core.dvc import restore_dvc_lock
from tasks.core.lock import LockState
from tasks.core.paths import ProjectPaths
from tasks.core.processes import ProcessId, owned_token
from tasks.core.recovery import fail_run_tree, remove_leftovers

log = logging.getLogger(__name__)


def _records_dir(root: Path) -> Path:
    return root / ".slimflow" / "runs"


@dataclass(frozen=True)
class RunRecord:
    """One pipeline run in progress, as the next start needs to know it if it dies."""

    flow_run_id: str
    pid: int
    started: float
    host: str
    since: float
    token: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    mlflow_repaired: bool = False

    @classmethod
    def begin(cls, root: Path, flow_run_id: str) -> RunRecord:
        me = ProcessId.current()
        record = cls(flow_run_id, me.pid, me.started, socket.gethostname(), time.time(), owned_token())
        return record.save(root)

    def path(self, root: Path) -> Path:
        return _records_dir(root) / f"{self.flow_run_id}.json"

    def save(self, root: Path) -> RunRecord:
        """Write the record (best effort: a full disk must not fail the run it describes)."""
        try:
            path = self.path(root)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self)))
            os.replace(tmp, path)
        except OSError as err:
            log.warning("could not write the run record of flow run %s: %s", self.flow_run_id, err)
        return self

    def update(self, root: Path, **changes: Any) -> RunRecord:
        return replace(self, **changes).save(root)

    def end(self, root: Path) -> None:
        self.path(root).unlink(missing_ok=True)

    def owner_dead(self) -> bool:
        return self.host == socket.gethostname() and not ProcessId(self.pid, self.started).alive()

    def reason(self) -> str:
        since = datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return (f"the run's process (pid {self.pid} on {self.host}, started {since}) died without ending it: "
                f"killed (kill -9, out of memory), crashed, or its `slimflow serve` was stopped; "
                f"marked by the next slimflow start at {now}")


def _records(root: Path) -> list[RunRecord]:
    records = []
    for path in sorted(_records_dir(root).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            records.append(RunRecord(**{k: data[k] for k in RunRecord.__dataclass_fields__ if k in data}))
        except (OSError, ValueError, TypeError, KeyError):
            path.unlink(missing_ok=True)
    return records


def stale_records(root: Path) -> list[RunRecord]:
    """Records of runs whose process is gone (on this host)."""
    return [record for record in _records(root) if record.owner_dead()]


def end_own_runs(root: Path, why: str) -> list[str]:
    """This process's pipeline runs: their MLflow runs still RUNNING (a stage stopped before it
    could end its own) end FAILED with ``why``; returns the run ids changed."""
    from mlflow import MlflowClient

    changed = []
    for record in _records(root):
        if record.pid == os.getpid() and record.mlflow_run_id and record.tracking_uri:
            changed += fail_run_tree(MlflowClient(record.tracking_uri), record.mlflow_run_id, why)
    return changed


def _fail_mlflow(record: RunRecord) -> list[str]:
    """The MLflow part: FAILED, with the reason, for the dead run's RUNNING runs."""
    if not record.mlflow_run_id or not record.tracking_uri:
        return []
    current = os.environ.get("MLFLOW_TRACKING_URI")
    if record.tracking_uri != current and not record.tracking_uri.startswith("sqlite:"):
        log.warning("MLflow run %s of the dead run is in %s, not the store in use (%s): left as it is",
                    record.mlflow_run_id, record.tracking_uri, current)
        return []
    from mlflow import MlflowClient

    return fail_run_tree(MlflowClient(record.tracking_uri), record.mlflow_run_id, record.reason())


def _crash_flow_run(flow_run_id: str, reason: str) -> bool:
    """The Prefect part: the dead run's flow run CRASHED with ``reason``, if the API in use
    knows it and it has not ended otherwise. True if it changed. A flow run Prefect's runner
    marked CRASHED first (it saw the process exit -9, as ``slimflow serve`` stops its runs,
    and guesses at an out-of-memory kill) gets the reason too: which proposal reaches the
    server first is a race."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:  # a run of another Prefect API
            return False
        if flow_run.state is not None and flow_run.state.is_final() and not flow_run.state.is_crashed():
            return False
        client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
        return True


def repair_stale_runs(root: Path, prefect: bool = True, note: Callable[[str], Any] = log.warning) -> int:
    """End the MLflow runs (and, with ``prefect``, the Prefect flow runs) of dead runs;
    returns how many dead runs were found. A part that fails is tried again next time."""
    records = stale_records(root)
    for record in records:
        try:
            failed = [] if record.mlflow_repaired else _fail_mlflow(record)
            record = record.update(root, mlflow_repaired=True)
            crashed = _crash_flow_run(record.flow_run_id, record.reason()) if prefect else False
        except Exception as err:  # a server that does not answer: next time
            note(f"could not yet repair the run of pid {record.pid} that died ({err}); trying again next start")
            continue
        if prefect:
            record.end(root)
        done = [f"MLflow run(s) {', '.join(failed)} marked FAILED"] if failed else []
        done += [f"Prefect flow run {record.flow_run_id} marked CRASHED"] if crashed else []
        if done:
            note(f"a run died without ending (pid {record.pid}): {'; '.join(done)}")
    return len(records)


def repair_after_crash(paths: ProjectPaths, lock: LockState, note: Callable[[str], Any]) -> None:
    """What a flow run does first, with the lock held: repair what dead runs left."""
    if lock.dead_owner is not None:
        killed = f"; killed {lock.killed_leftovers} process(es) it left" if lock.killed_leftovers else ""
        note(f"took over the pipeline lock from {lock.dead_owner.describe()}, which died holding it{killed}")
    repair_stale_runs(paths.root, note=note)
    if restore_dvc_lock(paths.root, only_if_broken=True):
        note("dvc.lock was left truncated by a dead run: restored to what it was before that run's stage")
    if removed := remove_leftovers(paths):
        note(f"removed what a dead run left: {', '.join(str(p.relative_to(paths.root)) for p in removed)}")
