"""The ``compress`` stage: every variant in ``compress.variants``, made from the trained baseline.

A variant is a recipe: steps applied in order to its parent (the baseline, or a variant
defined earlier), e.g. distill -> prune -> quantize. Every recipe is checked before any
work (``params.yaml`` validation, then :mod:`tasks.compression.recipes` for the
baseline's model family); :func:`~tasks.compression.variants.compress_variants` then
makes each variant into ``artifacts/compressed/<variant>/`` (model file +
``manifest.json``), each an MLflow run nested under the stage's run.

``python -m tasks.compress`` (the DVC stage command) reads ``params.yaml``; a bad recipe
or missing input prints ``error: <message>`` and exits 2 without writing anything.
"""

from __future__ import annotations

# In a pipeline run or a `dvc repro` this process becomes a child of a fork server (tasks.core.fork_server)
# before it imports anything else: the imports below took the entry 0.1-0.3 s for nothing.
if __name__ == "__main__":
    from tasks.core.dvc_fork_server import run_stage_forked

    run_stage_forked("tasks.compress")

import sys

from tasks.compression.recipes import RecipeError
from tasks.compression.variants import CompressError, VariantResult, check_inputs, compress_variants, variants_train
from tasks.core.config import ParamsError, load_params
from tasks.core.errors import report_stage_error, stage_main
from tasks.core.paths import ProjectPaths
from tasks.core.processes import die_with_parent, exit_process
from tasks.core.stage_cli import start_stage

__all__ = ["CompressError", "VariantResult", "compress_variants", "main"]


@stage_main("compress", lambda: ProjectPaths.discover().compressed)
def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.compress``: compress the baseline as ``params.yaml`` says."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m tasks.compress   (settings come from params.yaml: compress)", file=sys.stderr)
        return 2
    start_stage()
    paths = ProjectPaths.discover()
    try:
        params = load_params(paths.params)
        baseline = check_inputs(params, paths)
    except RecipeError as err:  # the recipe does not suit the baseline's model family
        report_stage_error("compress", f"{paths.params.name}: {err}")
        return 2
    except (ParamsError, CompressError) as err:
        report_stage_error("compress", str(err))
        return 2

    from tasks.core import tracking
    from tasks.core.energy import process_meter
    from tasks.core.fork_server_process import in_child
    from tasks.training import LaunchError, worker_pool

    meter = process_meter()  # sets itself up in the background while torch loads
    # The workers start now when a variant will train and this stage is a child of the
    # run's fork server: they start up while the variants that need no training are made
    # (on this process's one thread). Their processes are then the server's children, not
    # this one's; without the server (plain `dvc repro`) they would be, and the meter's
    # per-process estimate would count their start-up in the variant being made, so they
    # start at the first job, inside its exclusion, as before.
    start_workers = in_child() and variants_train(params, baseline)

    try:
        with tracking.stage_run(
            "compress", paths.root, params.base.experiment,
            params={"calibration_samples": params.compress.calibration_samples,
                    "fine_tune_lr": params.compress.fine_tune_lr,
                    "variants": ",".join(v.name for v in params.compress.variants),
                    "seed": params.base.seed},
        ) as run, worker_pool(params.train, paths.root, start=start_workers):
            # Every step that trains (QAT, fine-tunes, search trials, distillation) runs on
            # one set of Horovod workers.
            compress_variants(params, paths, stage_run_id=run.info.run_id)
            tracking.log_stage_energy(meter.read().total, meter.sources())
    except LaunchError as err:
        report_stage_error("compress", f"fine-tuning: {err}")
        return 1
    return 0


if __name__ == "__main__":
    die_with_parent()  # the stage dies with the run that started it (tasks.core.processes)
    exit_process(main())
