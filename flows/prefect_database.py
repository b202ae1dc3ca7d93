"""The Prefect database a project's background server starts from.

A new server migrates its new database first: 9 s of the first run on the 2-core machine,
against 4 s for a server on a migrated one. ``make install`` therefore leaves an empty,
migrated database for the venv's Prefect (:func:`write_database_template`; a server has
started on it once, so Prefect's block types are registered: 4.8 -> 4.4 s), and the
supervisor (:mod:`flows.prefect_server`) copies it into a project that has none
(:func:`seed_database`). ``python -m flows.prefect_database --write-database-template``
is ``make install``'s step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATABASE_URL_SETTINGS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def database_template() -> Path:
    """Where ``make install`` leaves an empty, migrated database for this venv's Prefect."""
    from importlib.metadata import version

    from tasks.core.paths import install_share

    return install_share() / f"prefect-{version('prefect')}.db"


def write_database_template(template: Path | None = None) -> tuple[Path, bool]:
    """Migrate a new Prefect database (``prefect server database reset``) into ``template``,
    with Prefect's block types registered where a server could start on it; returns the
    template and whether they are."""
    from flows.prefect_settings import PROJECT_DEFAULTS

    template = template or database_template()
    template.parent.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    with tempfile.TemporaryDirectory(prefix="slimflow-prefect-") as home:
        env = {k: v for k, v in os.environ.items() if k not in (*DATABASE_URL_SETTINGS, "PREFECT_API_URL")}
        env.update(PROJECT_DEFAULTS, PREFECT_HOME=home)
        subprocess.run([str(prefect), "server", "database", "reset", "-y"], env=env, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        registered = _register_block_types(env, Path(home) / "prefect.db")
        partial = template.with_name(f".{template.name}.partial")
        shutil.copyfile(Path(home) / "prefect.db", partial)
        os.replace(partial, template)
    return template, registered


def _register_block_types(env: dict[str, str], database: Path, timeout_s: float = 180.0) -> bool:
    """Start a server on the new database once (as a project's server starts:
    :mod:`flows.prefect_api`) and stop it when it answers: a server's first
    start registers Prefect's block types (0.4 s of a project's first server start on the
    2-core machine); its write-ahead log is then folded into the file. Best effort: where
    it fails, the project's first server registers them."""
    import sqlite3

    from flows.prefect_api import answers, api_server_command
    from tasks.core.paths import CODE_ROOT, code_on_path
    from tasks.core.processes import stop_process

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        api_server_command(port), cwd=CODE_ROOT, env=code_on_path(env),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not (answered := answers(f"http://127.0.0.1:{port}", timeout_s=2.0)):
            if server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        stop_process(server, grace_s=30)
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return answered


def seed_database(home: Path, template: Path | None = None) -> bool:
    """Copy the migrated template into a project's Prefect home that has no database yet
    (never over a project's history; not when the database is configured elsewhere)."""
    from tasks.core.paths import copy_if_missing

    if any(os.environ.get(name) for name in DATABASE_URL_SETTINGS):
        return False
    return copy_if_missing(template or database_template(), home / "prefect.db")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-database-template"]:
        print("usage: python -m flows.prefect_database --write-database-template", file=sys.stderr)
        sys.exit(2)
    path, registered = write_database_template()
    print(f"Prefect database template: {path} ({'block types registered' if registered else 'migrated only'})")
