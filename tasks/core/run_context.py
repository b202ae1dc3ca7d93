"""The run context: what a pipeline run hands each stage process it starts.

A stage runs as a DVC command in a child process, so the flow cannot call it with
arguments; it passes one typed object instead, serialized as JSON in the one environment
variable ``SLIMFLOW_RUN_CONTEXT``. The flow sets it with :meth:`RunContext.exported`
around each stage (and removes it after); a stage reads it with :meth:`RunContext.current`.
A stage started by plain ``dvc repro`` finds none and gets an empty context: its MLflow
run is then a top-level run in ``base.experiment``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ENV = "SLIMFLOW_RUN_CONTEXT"


@dataclass(frozen=True)
class RunContext:
    """Links a stage's MLflow run to its pipeline run and its failure to the flow."""

    parent_run_id: str | None = None   # the pipeline's MLflow run: stage runs nest under it
    flow_run_id: str | None = None     # the Prefect flow run, recorded as a tag
    experiment_id: str | None = None   # the pipeline run's MLflow experiment
    error_file: str | None = None      # where the stage writes its one-line failure reason

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> RunContext:
        """The context this process was started with (empty outside a pipeline run)."""
        text = (os.environ if environ is None else environ).get(ENV)
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"${ENV} is not valid JSON: {text[:200]!r}") from None
        known = {name: data.get(name) for name in cls.__dataclass_fields__}
        return cls(**known)

    def with_error_file(self, path: Path | None) -> RunContext:
        return replace(self, error_file=str(path) if path else None)

    def as_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self), sort_keys=True)}

    @contextmanager
    def exported(self) -> Iterator[RunContext]:
        """Set this context for the child processes started inside the block."""
        previous = os.environ.get(ENV)
        os.environ.update(self.as_env())
        try:
            yield self
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous
