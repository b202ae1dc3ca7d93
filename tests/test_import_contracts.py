"""Arrows point one way: the import contracts of pyproject.toml ([tool.importlinter]),
checked with import-linter on this tree, and shown to fail on a tree that breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "models")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` (its own interpreter, so the
    packages are found under ``root`` and nothing is cached between runs)."""
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(exe), "--no-cache", str(root / "pyproject.toml")],
        cwd=root, env={"PATH": str(exe.parent), "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300,
    )


def copy_tree(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_code_keeps_every_import_contract() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout


def test_every_module_of_tasks_is_in_a_layer() -> None:
    """A new top-level module of tasks/ must be placed in the stage layering, or the
    layers contract would not see its arrows."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["id"] == "stage-layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    modules = {
        f"tasks.{path.stem if path.is_file() else path.name}"
        for path in (REPO / "tasks").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    }
    assert modules - placed == set(), f"modules of tasks/ missing from the stage-layers contract: {sorted(modules - placed)}"


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        ("tasks/core/paths.py", "import tasks.evaluate", "tasks.core is not allowed to import tasks.evaluate"),
        ("models/mlp.py", "import mlflow", "models/ does no I/O"),
        ("tasks/training/__init__.py", "import flows.cli", "tasks is not allowed to import flows"),
        ("tasks/core/dvc.py", "import tasks.core.tables\nimport tasks.core.run_context", None),
    ],
)
def test_a_tree_that_breaks_a_contract_fails(tmp_path: Path, module: str, bad_import: str, broken: str | None) -> None:
    root = copy_tree(tmp_path)
    target = root / module
    target.write_text(target.read_text() + f"\n{bad_import}  # deliberate\n")
    done = lint_imports(root)
    if broken is None:  # a downward import inside core is fine
        assert done.returncode == 0, done.stdout[-3000:]
        return
    assert done.returncode != 0
    assert broken in done.stdout, done.stdout[-3000:]


def test_a_cycle_inside_a_package_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    # tasks.core.tracking imports tasks.core.run_context; the reverse closes a cycle.
    target = root / "tasks" / "core" / "run_context.py"
    target.write_text(target.read_text() + "\n\ndef _cycle() -> None:\n    from tasks.core import tracking  # deliberate\n")
    done = lint_imports(root)
    assert done.returncode != 0
    assert "No cycles are allowed in tasks.core" in done.stdout, done.stdout[-3000:]
