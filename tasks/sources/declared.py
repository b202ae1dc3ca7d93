"""What the raw data says before it is read, for the checks made before any stage runs
(``slimflow run``, ``slimflow serve``, the flow): that the paths ``prepare`` names are
there, and, where the format says it up front (an ``npz``'s array header), the shape one
sample will have once prepared. The prepare stage reads and checks everything itself
(``dvc repro`` runs no check before it); this only moves the commonest refusals before a
run starts, so that nothing changes: no flow run, no MLflow run, ``params.yaml`` as it was.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.config import BUILTIN_SOURCES, FOLDER_SOURCES, ParamsError, PrepareParams
from tasks.sources.tabular import npz_input_shape


def check_raw_data(prepare: PrepareParams, root: Path, source: str = "params.yaml") -> tuple[int, ...] | None:
    """Refuse (:class:`ParamsError`, naming the key and the path) a ``prepare.path`` or
    ``prepare.labels_path`` under project ``root`` that is not there, or not a file (a
    folder for the folder sources). Returns one sample's shape as prepared where the raw
    data declares it (``npz``), else None."""
    if prepare.source in BUILTIN_SOURCES:
        return None  # scikit-learn's own files; prepare.path is not read
    named = [("path", prepare.path, prepare.source in FOLDER_SOURCES)] if prepare.path else []
    if prepare.source == "idx" and prepare.labels_path:
        named.append(("labels_path", prepare.labels_path, False))
    for key, name, folder in named:
        path = root / name
        if not path.exists():
            tracked = (root / f"{name.rstrip('/')}.dvc").is_file()
            hint = f" (tracked by DVC: `dvc pull {name.rstrip('/')}.dvc` fetches it)" if tracked else ""
            raise ParamsError(f"{source}: prepare.{key}: {name}: not found{hint}")
        if folder and not path.is_dir():
            raise ParamsError(f"{source}: prepare.{key}: {name}: not a folder (source {prepare.source} reads one "
                              "sub-folder per class)")
        if not folder and not path.is_file():
            raise ParamsError(f"{source}: prepare.{key}: {name}: not a file (source {prepare.source} reads one)")
    if prepare.source == "npz" and prepare.path:
        return npz_input_shape(root / prepare.path, prepare.npz_inputs, prepare.npz_channels)
    return None
