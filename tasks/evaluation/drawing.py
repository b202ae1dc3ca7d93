"""The evaluate stage's figures, drawn in a process of their own while the stage logs its
models to MLflow: the two used to run one after the other on one core (4-5 s each in the
default run, on two cores). Two parts, each its own process:

- ``models``: what needs only the scored models (each model's confusion matrix, the
  training curves: :func:`tasks.evaluation.outputs.render_model_figures`), drawn while the
  stage logs its models and the memory probe runs, before anything is timed;
- ``comparison``: the rest (:func:`tasks.evaluation.outputs.render_outputs`: the trade-off
  figures, the tables), once the models are timed and gated, while the stage logs their
  figures; it also draws any figure of the first part not there yet.

``python -m tasks.evaluation.drawing STAGING [PART]`` reads ``STAGING/drawing-input-PART.pickle``
(an :class:`~tasks.evaluation.results.Evaluation` and the training history), draws its part
into ``STAGING`` and removes the input. In a pipeline run it is a child of the run's fork server, which has
imported matplotlib already; by itself (``dvc repro``) it imports what it needs (0.6 s).
Its log lines and any error go to the stage's own output.

Energy: the process measures its own (``drawing-energy.json``). Where the stage's meter
is a per-process estimate, which does not see this process, the stage is credited with
it; a RAPL meter reads the whole CPU package, this process included, and is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.errors import stage_main
from tasks.core.paths import ProjectPaths, code_on_path
from tasks.core.stage_cli import setup_logging
from tasks.evaluation.results import Evaluation

MODULE = "tasks.evaluation.drawing"
MODEL_FIGURES, COMPARISON = "models", "comparison"  # the two parts
INPUT = "drawing-input-{part}.pickle"
ENERGY = "drawing-energy-{part}.json"  # {"cpu_j", "gpu_j", "source"}: what drawing used


class DrawingFailed(RuntimeError):
    """The drawing process exited with an error (its one-line error is in the stage's output,
    its traceback in ``.slimflow/evaluate-traceback.log``)."""


@contextlib.contextmanager
def figures_drawn_meanwhile(staging: Path, evaluation: Evaluation, history: list[dict[str, Any]] | None,
                            part: str = COMPARISON) -> Iterator[None]:
    """Draw ``part`` of the figures of ``evaluation`` into ``staging`` in another process
    while the block runs; on leaving, wait for it (:class:`DrawingFailed` if it failed). A
    block that raises stops the drawing."""
    from tasks.core.processes import stop_process

    source = staging / INPUT.format(part=part)
    with open(source, "wb") as handle:
        pickle.dump((evaluation, history), handle, protocol=pickle.HIGHEST_PROTOCOL)
    process = subprocess.Popen([sys.executable, "-m", MODULE, str(staging), part],
                               env=code_on_path(dict(os.environ)), stdin=subprocess.DEVNULL)
    try:
        yield
    except BaseException:
        stop_process(process, grace_s=2.0)
        raise
    code = process.wait()
    if code != 0:
        raise DrawingFailed(f"drawing the evaluation figures ({part}) into {staging} failed "
                            f"(exit {code}; its error is above)")
    _credit_energy(staging / ENERGY.format(part=part))


def _credit_energy(report: Path) -> None:
    from tasks.core.energy import Joules, credit_children, process_meter

    used = json.loads(report.read_text())
    report.unlink()
    if process_meter().estimated:
        credit_children(Joules(used["cpu_j"], used["gpu_j"]), used["source"])


def draw(staging: Path, part: str = COMPARISON) -> None:
    """The process's work: render ``part`` of the pickled evaluation into ``staging``; then
    say what energy that took."""
    from tasks.core.energy import process_meter
    from tasks.evaluation.outputs import render_model_figures, render_outputs

    meter = process_meter()  # sets itself up in the background
    source = staging / INPUT.format(part=part)
    with open(source, "rb") as handle:
        evaluation, history = pickle.load(handle)
    (render_model_figures if part == MODEL_FIGURES else render_outputs)(staging, evaluation, history)
    source.unlink()
    used = meter.read()
    (staging / ENERGY.format(part=part)).write_text(
        json.dumps({"cpu_j": used.cpu, "gpu_j": used.gpu, "source": meter.source}))


@stage_main("evaluate", lambda: ProjectPaths.discover().evaluation)
def main(argv: list[str] | None = None) -> int:
    """A failure is one line (the traceback kept as the stage's, see :func:`stage_main`), exit 1."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[1:] not in ([], [MODEL_FIGURES], [COMPARISON]):
        print(f"usage: python -m {MODULE} STAGING [{MODEL_FIGURES}|{COMPARISON}]", file=sys.stderr)
        return 2
    setup_logging()
    draw(Path(args[0]), *args[1:])
    return 0


if __name__ == "__main__":
    from tasks.core.fork_server import run_forked
    from tasks.core.processes import die_with_parent, exit_process

    run_forked(MODULE)  # in a pipeline run: a child of its fork server, matplotlib imported
    die_with_parent()  # the drawing dies with the stage that asked for it
    exit_process(main())
