"""Stage dependencies that cannot go stale: every project module a stage's entry imports
(transitively, function-level imports included) or starts as a process
(``python -m tasks...``) is covered by a ``deps`` entry of that stage in dvc.yaml, so
editing code re-runs exactly the stages that use it."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "models", "flows")


def module_file(root: Path, module: str) -> Path:
    path = root.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _launched_modules(root: Path, module: str, known: set[str]) -> set[str]:
    """Project modules named as string constants (``[python, "-m", "tasks.x"]``): processes it starts."""
    tree = ast.parse(module_file(root, module).read_text())
    return {
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known
    }


def stage_modules(root: Path, entry: str) -> set[str]:
    """``entry`` and every project module it imports or launches, transitively (grimp's
    import graph counts imports inside functions too)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    known = set(graph.modules)
    found: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in found:
            continue
        found.add(module)
        # A package's __init__ runs whenever one of its modules is imported.
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += [m for m in graph.find_modules_directly_imported_by(module) if m in known]
        todo += _launched_modules(root, module, known)
    return found


def has_code(path: Path) -> bool:
    """False for a module that is only a docstring (an empty package ``__init__``)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def uncovered_modules(root: Path) -> dict[str, list[str]]:
    """Stage -> project files its code uses that none of its ``deps`` cover."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    missing: dict[str, list[str]] = {}
    for name, stage in stages.items():
        entry = re.fullmatch(r"python -m ([\w.]+)", stage["cmd"].strip())
        assert entry, f"stage {name}: expected `python -m <module>`, got {stage['cmd']!r}"
        deps = [root / dep for dep in stage.get("deps", [])]
        files = sorted(
            module_file(root, m).relative_to(root) for m in stage_modules(root, entry.group(1))
            if has_code(module_file(root, m))
        )
        gaps = [str(f) for f in files if not any((root / f) == dep or dep in (root / f).parents for dep in deps)]
        if gaps:
            missing[name] = gaps
    return missing


def _isolated_checker(root: Path) -> dict[str, list[str]]:
    """Run the check on another tree in a fresh interpreter (grimp imports from sys.path)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "from test_stage_deps import uncovered_modules; from pathlib import Path;"
        "print(json.dumps(uncovered_modules(Path(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root), str(Path(__file__).parent)],
        cwd=root, capture_output=True, text=True, timeout=300, env={"PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return json.loads(done.stdout)


def test_every_stage_lists_the_modules_it_uses() -> None:
    assert uncovered_modules(REPO) == {}


def test_config_and_data_code_are_dependencies_of_the_stages_that_read_them() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert "tasks/core" in stages[name]["deps"], f"{name}: tasks/core (params defaults) is not a dependency"
    for name in ("train", "evaluate"):
        assert "tasks/data.py" in stages[name]["deps"]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_a_dependency_dropped_from_dvc_yaml_is_found(repo_copy: Path) -> None:
    dvc_yaml = repo_copy / "dvc.yaml"
    pipeline = yaml.safe_load(dvc_yaml.read_text())
    pipeline["stages"]["train"]["deps"].remove("tasks/data.py")
    dvc_yaml.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    assert _isolated_checker(repo_copy) == {"train": ["tasks/data.py"]}


def test_a_new_import_of_an_unlisted_module_is_found(repo_copy: Path) -> None:
    # prepare does not list tasks/compression; an import of it from prepare's code must be caught.
    target = repo_copy / "tasks" / "sources" / "common.py"
    target.write_text(target.read_text() + "\n\ndef _new() -> None:\n    from tasks.compression import recipes  # deliberate\n")
    missing = _isolated_checker(repo_copy)
    assert "tasks/compression/recipes.py" in missing.get("prepare", [])
