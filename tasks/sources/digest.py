"""The raw data's DVC hash: what the data card and MLflow record as the data digest."""

from __future__ import annotations

import logging
import os
from pathlib import Path



logger = logging.getLogger(__name__)


def dvc_digest(path: Path) -> str:
    """The DVC 3 content hash of a raw file or folder.

    The md5 recorded by ``dvc add`` in ``<path>.dvc`` (``outs[0].md5``) when that file is
    there; otherwise computed with dvc-data exactly as ``dvc add`` would: md5 of the
    bytes for a file, the ``<md5>.dir`` tree hash for a folder.
    """
    recorded = _recorded_md5(path)
    if recorded:
        return recorded
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem, localfs

    # dry_run: hash only; the staging object store is in memory and nothing is cached.
    odb = HashFileDB(MemoryFileSystem(), "memory://slimflow-digest")
    _, _, obj = build(odb, os.fspath(path), localfs, "md5", dry_run=True)
    return str(obj.hash_info.value)


def _recorded_md5(path: Path) -> str | None:
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    import yaml

    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        out = outs[0]
        if out.get("path") not in (None, path.name):
            return None
        return str(out["md5"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
        logger.warning("%s: unreadable .dvc file; computing the digest instead", dvc_file)
        return None
