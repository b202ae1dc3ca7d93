"""What every stage's ``python -m tasks.<stage>`` entry shares: arguments, logging, no telemetry."""

from __future__ import annotations

import argparse
import logging

from tasks.core.telemetry import turn_off_telemetry

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def start_stage() -> None:
    """What a stage process does first: its log lines, and no usage telemetry from MLflow or ONNX
    Runtime (set before the stage loads them, under ``dvc repro`` too)."""
    setup_logging()
    turn_off_telemetry()


def parse_stage_args(stage: str, description: str, argv: list[str] | None, example: str) -> argparse.Namespace:
    """``--set KEY=VALUE`` (repeatable, validated like params.yaml, not written to it) for
    manual runs; DVC runs stages without arguments. Also :func:`start_stage`."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=description)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a parameter, e.g. --set {example} (validated like params.yaml)",
    )
    args = parser.parse_args(argv)
    start_stage()
    return args
