"""The DVC bridge: stage names from dvc.yaml, stage selection, the project lock, and one
stage reproduced through DVC's API with the run context handed to its process (real DVC)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tasks.core import dvc as dvc_bridge
from tasks.core.run_context import RunContext

REPO = Path(__file__).resolve().parents[1]


def test_stage_names_come_from_dvc_yaml_in_its_order() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert dvc_bridge.stage_names(REPO) == tuple(stages) == ("prepare", "train", "compress", "evaluate")


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [(None, None, ["prepare", "train", "compress", "evaluate"]), ("train", "compress", ["train", "compress"]),
     ("evaluate", None, ["evaluate"]), (None, "prepare", ["prepare"])],
)
def test_select_stages(first: str | None, last: str | None, expected: list[str]) -> None:
    assert dvc_bridge.select_stages(first, last, REPO) == expected


def test_select_stages_refuses_unknown_and_empty_ranges() -> None:
    with pytest.raises(ValueError, match="unknown stage 'deploy': expected one of prepare, train, compress, evaluate"):
        dvc_bridge.select_stages("deploy", None, REPO)
    with pytest.raises(ValueError, match="stage range evaluate..train is empty"):
        dvc_bridge.select_stages("evaluate", "train", REPO)


def test_the_project_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    with dvc_bridge.pipeline_lock(tmp_path):
        code = ("import sys; from pathlib import Path; from tasks.core.dvc import pipeline_lock, PipelineBusy\n"
                "try:\n    pipeline_lock(Path(sys.argv[1])).__enter__()\nexcept PipelineBusy as err:\n    print(err)")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert f"held by pid {os.getpid()}" in done.stdout
    assert "--wait SECONDS" in done.stdout
    with dvc_bridge.pipeline_lock(tmp_path):  # released: free again
        pass


@pytest.fixture
def dvc_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC project with two stages: one records the run context it got, one fails as
    a stage does on bad input (one message, exit code 2)."""
    root = tmp_path / "p"
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / "__init__.py").write_text("")
    (root / "tasks" / "record.py").write_text(textwrap.dedent("""
        import json, pathlib
        from tasks.core.run_context import RunContext
        pathlib.Path("out.json").write_text(json.dumps(RunContext.current().__dict__))
    """))
    (root / "tasks" / "refuse.py").write_text(textwrap.dedent("""
        import sys
        from tasks.core.errors import report_stage_error
        report_stage_error("refuse", "params.yaml: refuse.x: must be positive")
        sys.exit(2)
    """))
    (root / "scripts").mkdir()
    (root / "scripts" / "curves.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from tasks.compression.variants import _write_curves
        _write_curves(Path("plots/sensitivity"), {})  # no structured search: the default recipes
        _write_curves(Path("plots/search"), {"pruned-l1-auto": [{"setting": 0.5, "val_accuracy": 0.9}]})
    """))
    pythonpath = f"{root}{os.pathsep}{REPO}"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "record": {"cmd": f"PYTHONPATH={pythonpath} python -m tasks.record", "deps": ["tasks/record.py"], "outs": ["out.json"]},
        "refuse": {"cmd": f"PYTHONPATH={pythonpath} python -m tasks.refuse", "deps": ["tasks/refuse.py"]},
        # The compress stage's plot folders, written by its own code: one without curves, one with.
        "plot": {"cmd": f"PYTHONPATH={REPO} python scripts/curves.py", "deps": ["scripts/curves.py"],
                 "plots": ["plots/sensitivity", "plots/search"]},
        # Each time its command runs it says so in commands.log (not an output).
        "tally": {"cmd": "cat setting.txt > tallied.txt && echo ran >> commands.log", "deps": ["setting.txt"],
                  "outs": ["tallied.txt"]},
    }}))
    for command in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=root, check=True)
    monkeypatch.chdir(root)  # the flow runs in the project root, as `dvc repro` does
    return root


@pytest.mark.integration
def test_a_stage_whose_inputs_ran_before_is_restored_from_the_run_cache_not_run(dvc_project: Path) -> None:
    """DVC's ``reproduce`` lists a stage it checked out of its run cache among those it
    ran; the bridge tells them apart, so a run does not say a stage ran that did not."""
    setting = dvc_project / "setting.txt"
    outcomes = []
    for value in ("a", "b", "a", "a"):
        setting.write_text(value)
        outcomes.append(dvc_bridge.reproduce_stage(dvc_project, "tally"))
    Reproduced = dvc_bridge.Reproduced
    assert outcomes == [Reproduced.RAN, Reproduced.RAN, Reproduced.RESTORED, Reproduced.SKIPPED]
    assert (dvc_project / "tallied.txt").read_text() == "a"  # the outputs of "a", from the cache
    assert (dvc_project / "commands.log").read_text().split() == ["ran", "ran"]
    assert dvc_bridge.reproduce_stage(dvc_project, "tally", force=True) is Reproduced.RAN  # --force runs it
    assert (dvc_project / "commands.log").read_text().split() == ["ran"] * 3


@pytest.mark.integration
def test_a_stage_gets_the_run_context_and_runs_once(dvc_project: Path) -> None:
    context = RunContext(parent_run_id="run-1", flow_run_id="flow-1", experiment_id="3")
    assert dvc_bridge.reproduce_stage(dvc_project, "record", context=context) is dvc_bridge.Reproduced.RAN
    got = json.loads((dvc_project / "out.json").read_text())
    assert {k: got[k] for k in ("parent_run_id", "flow_run_id", "experiment_id")} == \
        {"parent_run_id": "run-1", "flow_run_id": "flow-1", "experiment_id": "3"}
    assert got["error_file"].endswith(".slimflow/record.error")
    assert dvc_bridge.reproduce_stage(dvc_project, "record", context=context) is dvc_bridge.Reproduced.SKIPPED
    assert dvc_bridge.pipeline_status(dvc_project, ["record"]) == {}
    assert "SLIMFLOW_RUN_CONTEXT" not in os.environ


@pytest.mark.integration
def test_a_failing_stage_raises_its_own_message_and_exit_code(dvc_project: Path) -> None:
    with pytest.raises(dvc_bridge.StageFailed) as failed:
        dvc_bridge.reproduce_stage(dvc_project, "refuse")
    assert str(failed.value) == "refuse: params.yaml: refuse.x: must be positive"
    assert failed.value.bad_input
    assert not (dvc_project / ".slimflow" / "refuse.error").exists()


@pytest.mark.integration
def test_a_plot_folder_without_curves_holds_an_empty_series_and_dvc_does_not_warn(
    dvc_project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plot folder of one file per trained or searched variant has no file when no variant
    trains or searches (the default recipes' plots/sensitivity). Empty, it made DVC warn
    "'plots/sensitivity' is empty." on every plain `dvc repro`; it holds none.json, an empty
    series, instead. A folder with curves holds exactly them."""
    dvc_log = logging.getLogger("dvc")  # DVC's records stop at its own logger (printed once)
    dvc_log.addHandler(caplog.handler)
    try:
        assert dvc_bridge.reproduce_stage(dvc_project, "plot") is dvc_bridge.Reproduced.RAN
    finally:
        dvc_log.removeHandler(caplog.handler)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert [p.name for p in (dvc_project / "plots" / "sensitivity").iterdir()] == ["none.json"]
    assert json.loads((dvc_project / "plots" / "sensitivity" / "none.json").read_text()) == []
    assert [p.name for p in (dvc_project / "plots" / "search").iterdir()] == ["pruned-l1-auto.json"]
    # `dvc plots show` takes the empty series without a word.
    shown = subprocess.run([str(Path(sys.executable).parent / "dvc"), "plots", "show", "--json"], cwd=dvc_project,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "WARNING" not in shown.stderr + shown.stdout, shown.stderr
    assert json.loads(shown.stdout)["data"]["plots/sensitivity/none.json"] == []


@pytest.mark.integration
def test_dvc_messages_are_printed_once_not_again_by_the_root_logger(dvc_project: Path) -> None:
    """DVC gives its logger handlers of its own; a flow run also has Prefect's console
    handler on the root logger, which printed every DVC line a second time."""
    script = textwrap.dedent(f"""
        import logging, sys
        from pathlib import Path
        # A console handler on the root logger, as Prefect's in a flow run.
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="root: %(message)s")
        from tasks.core import dvc
        assert dvc.reproduce_stage(Path({str(dvc_project)!r}), "record") is dvc.Reproduced.RAN
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=dvc_project, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("Running stage 'record'") == 1, output
    assert output.count("Updating lock file 'dvc.lock'") == 1, output
    assert "root: Running stage" not in output, output



@pytest.mark.integration
def test_a_failed_stage_leaves_its_outputs_of_before_as_dvc_lock_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC removes a stage's outputs before it runs the command: a stage that then failed
    (bad data) left none, and `dvc status` called the last good ones deleted. They are put
    back: the cached folder from DVC's cache, the uncached metrics file from a copy."""
    root = tmp_path / "p"
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / "__init__.py").write_text("")
    (root / "tasks" / "make.py").write_text(textwrap.dedent("""
        import json, pathlib, sys
        from tasks.core.errors import report_stage_error
        text = pathlib.Path("source.txt").read_text()
        if text.startswith("corrupt"):
            report_stage_error("make", "source.txt: cannot read: corrupt")
            sys.exit(2)
        pathlib.Path("model").mkdir()
        pathlib.Path("model/weights.txt").write_text(text)
        pathlib.Path("metrics.json").write_text(json.dumps({"chars": len(text)}))
    """))
    pythonpath = f"{root}{os.pathsep}{REPO}"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": f"PYTHONPATH={pythonpath} python -m tasks.make", "deps": ["source.txt"],
        "outs": ["model"], "metrics": [{"metrics.json": {"cache": False}}]}}}))
    (root / "source.txt").write_text("good data")
    for command in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=root, check=True)
    monkeypatch.chdir(root)
    assert dvc_bridge.reproduce_stage(root, "make") is dvc_bridge.Reproduced.RAN
    lock = (root / "dvc.lock").read_bytes()

    (root / "source.txt").write_text("corrupt data")
    with pytest.raises(dvc_bridge.StageFailed, match="source.txt: cannot read: corrupt"):
        dvc_bridge.reproduce_stage(root, "make")
    assert (root / "model" / "weights.txt").read_text() == "good data"
    assert json.loads((root / "metrics.json").read_text()) == {"chars": 9}
    assert (root / "dvc.lock").read_bytes() == lock
    # Only the change the user made is left for DVC to see; no output is missing.
    assert dvc_bridge.pipeline_status(root, ["make"]) == {"make": [{"changed deps": {"source.txt": "modified"}}]}
    assert not list((root / ".slimflow").glob("*.outputs-before"))

    (root / "source.txt").write_text("good data")  # back as it was: up to date again, nothing to run
    assert dvc_bridge.reproduce_stage(root, "make") is dvc_bridge.Reproduced.SKIPPED
