"""Where the pipeline reads and writes, relative to the project root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `tasks` and `models` packages


def code_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`CODE_ROOT` first on ``PYTHONPATH``: a ``python -m tasks...``
    helper process imports this code, not an installed copy of it."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))}


def install_share() -> Path:
    """Where ``make install`` leaves files for every project of this venv (database templates)."""
    import sys

    return Path(sys.prefix) / "share" / "slimflow"


def copy_if_missing(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` unless ``target`` exists (a database template into a new
    project): whole or not at all, and never over a file another process made meanwhile
    (``os.link`` of a private partial copy). False when it did not copy."""
    import shutil

    if target.exists() or not source.is_file() or not target.parent.is_dir():
        return False
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(source, partial)
        os.link(partial, target)
    except OSError:  # made meanwhile, or not possible here
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder holding ``dvc.yaml`` (or ``$SLIMFLOW_ROOT``)."""
    if env := os.environ.get("SLIMFLOW_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def discover(cls, start: Path | None = None) -> ProjectPaths:
        return cls(find_project_root(start))

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def model(self) -> Path:
        """The trained baseline: the train stage's output folder."""
        return self.artifacts / "model"

    @property
    def checkpoints(self) -> Path:
        """Per-epoch training state, kept across runs (a persistent DVC output)."""
        return self.artifacts / "checkpoints"

    @property
    def compressed(self) -> Path:
        return self.artifacts / "compressed"

    @property
    def evaluation(self) -> Path:
        return self.artifacts / "evaluation"

    @property
    def metrics(self) -> Path:
        """DVC metrics files (small JSON, kept out of the cache)."""
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        """DVC plots data and images."""
        return self.root / "plots"
