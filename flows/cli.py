"""The ``slimflow`` command line: run, serve, status, report, params.

Every error is one line on stderr (:mod:`flows.errors`); ``slimflow run --debug`` prints
the traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
import traceback
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.table import Table

from flows.champion import app as champion_app
from flows import errors, prefect_server
from flows.errors import OneLineErrors, one_line, one_line_console_logs, print_error
from flows.prefect_settings import use_project_prefect_settings
from flows.report import comparison_table
from tasks.compression.recipes import check_pipeline
from tasks.core.config import Params, ParamsError, load_params, params_schema
from tasks.core.dvc import select_stages, stage_names
from tasks.core.paths import ProjectPaths
from tasks.core.processes import CollectorPaused, exit_process
from tasks.core.tables import console as table_console
from tasks.core.telemetry import turn_off_telemetry

app = OneLineErrors(
    help="slimflow: train with Horovod, compress, evaluate - orchestrated by Prefect, "
    "versioned by DVC, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(champion_app, name="champion")
console = table_console()


@app.callback()
def _project_settings() -> None:
    """Every command: from the project's root, Prefect's settings for this project, and no
    usage telemetry from MLflow or ONNX Runtime (:mod:`tasks.core.telemetry`), before any
    of them is imported.

    From the root, as DVC runs the stages: a local MLflow store puts a new experiment's
    files under ``./mlruns`` of the working directory, so a run started in ``data/`` made
    ``data/mlruns/`` (outside ``.gitignore``)."""
    root = ProjectPaths.discover().root
    os.chdir(root)
    use_project_prefect_settings(root)
    turn_off_telemetry()


def _check_stage_names(*names: str | None) -> None:
    known = stage_names(ProjectPaths.discover().root)
    for name in names:
        if name is not None and name not in known:
            _fail(f"unknown stage {name!r}; stages: {', '.join(known)}")


def _fail(message: str, code: int = 2, err: BaseException | None = None, single: bool = True) -> NoReturn:
    """Print ``error: <message>`` (one line unless told) and exit with ``code``."""
    if err is not None and errors.debug():
        traceback.print_exception(err)
    print_error(" ".join(message.split()) if single else message, err)
    raise typer.Exit(code)


def _checked_params(paths: ProjectPaths, overrides: list[str], stages: list[str] | None = None) -> Params:
    """``params.yaml`` with ``overrides``, valid and a pipeline ``run`` of ``stages`` (None:
    all) accepts (the raw data there when ``prepare`` is to run, the family reads the
    source's data, every recipe suits it); else one line, exit 2."""
    from tasks.sources import check_raw_data

    try:
        loaded = load_params(paths.params, overrides)
        reads_raw = stages is None or "prepare" in stages
        check_pipeline(loaded, input_shape=check_raw_data(loaded.prepare, paths.root) if reads_raw else None)
    except ParamsError as err:
        _fail(str(err))
    return loaded


def _check_servers() -> None:
    """Stop in seconds, with one line, when a configured server does not answer."""
    from flows.health import ServerDown, check_servers

    try:
        check_servers()
    except ServerDown as err:
        _fail(str(err), code=1)


def _spared(process: Any) -> bool:
    """Prefect's temporary API server (the flow still has to report its state), the project's
    background server (``flows.prefect_server`` and the API server it runs,
    ``flows.prefect_api``: they outlive runs) and the run's reaper (it has to outlive the run)
    are not stopped with the stage."""
    from flows.prefect_api import MODULE as API_SERVER
    from tasks.core.processes import is_reaper

    try:
        cmdline = process.cmdline()
    except Exception:
        return False
    command = " ".join(cmdline)
    return (is_reaper(cmdline) or f"-m {API_SERVER} " in command
            or ("prefect" in command and ("server" in command or "uvicorn" in command)))


def _interrupt_on_sigterm() -> None:
    """SIGTERM (and SIGHUP: a closed terminal) behaves like Ctrl-C: stop the running
    stage, unwind, mark the runs FAILED.

    A stage runs in a child process (DVC's command) that SIGTERM to this process alone
    would leave running, holding the DVC lock; so the children are terminated first.
    (SIGKILL cannot be handled: then the run's reaper and the parent-death signals of
    tasks.core.processes stop the children, and the next run repairs the states.)
    """
    import signal

    import psutil

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children = [c for c in psutil.Process().children(recursive=True) if not _spared(c)]
        for child in children:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        # Time for the stage to end its MLflow run and stop its workers (horovodrun gives
        # them 5 s, the launcher horovodrun 30 s); what is left then is killed.
        _, alive = psutil.wait_procs(children, timeout=40)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _up_to_date(paths: ProjectPaths, stages: list[str]) -> bool:
    """True (and say so) when DVC finds nothing to do in ``stages``: then no flow run is started.

    Starting Prefect's temporary API costs more than the whole check (about 15 s), and a
    run whose every stage would be skipped changes nothing anyone can see.
    """
    from tasks.core.dvc import pipeline_status

    try:
        changed = pipeline_status(paths.root, stages)
    except Exception:  # e.g. DVC busy: let the flow report it properly
        return False
    if changed:
        return False
    console.print(f"{', '.join(stages)}: up to date according to DVC; nothing to run (use --force to rerun)")
    from flows.report import comparison_rows

    if rows := comparison_rows(paths):
        console.print(comparison_table(rows))
    return True


@app.command()
def run(
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-S", help="Override a parameter: --set train.epochs=3 (repeatable; -S as in dvc exp run); recorded in params.yaml.")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="First stage to run (a stage of dvc.yaml: prepare, train, compress, evaluate).")] = None,
    to_stage: Annotated[Optional[str], typer.Option("--to", help="Last stage to run.")] = None,
    force: Annotated[bool, typer.Option(help="Run the selected stages even if DVC says they are up to date.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for another pipeline run of this project to finish (default: refuse at once); waiting runs start in the order they were started.")] = 0.0,
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of an error (otherwise kept in .slimflow/last-error.log).")] = False,
) -> None:
    """Run the pipeline (or a range of stages) as a Prefect flow; unchanged stages are skipped."""
    if debug:
        errors.set_debug()
    with CollectorPaused() as collector:  # until the imports are done (they are most of a run's objects)
        _run_command(set_, from_stage, to_stage, force, wait, collector)


def _run_command(set_: list[str] | None, from_stage: str | None, to_stage: str | None, force: bool, wait: float,
                 collector: CollectorPaused) -> None:
    paths = ProjectPaths.discover()
    overrides = list(set_ or [])
    _check_stage_names(from_stage, to_stage)
    try:
        stages = select_stages(from_stage, to_stage, paths.root)
    except ValueError as err:
        _fail(str(err))
    _checked_params(paths, overrides, stages)  # refuse bad input before anything starts

    if not overrides and not force and _up_to_date(paths, stages):
        return

    _check_servers()
    from tasks.core.fork_server import fork_server
    from tasks.core.processes import own_process_tree

    # From here on every process this run starts (the stages, horovodrun and its workers;
    # Prefect's temporary API server if one is used; not the project's background Prefect
    # server, which outlives runs) dies with it, even on kill -9.
    own_process_tree()
    with contextlib.ExitStack() as held:
        # The stages' and workers' imports load while Prefect's server starts or is found,
        # and so do this process's MLflow and Prefect (the flow's first calls would import
        # them; Prefect once its server's URL is set: it reads its settings at import). Two
        # threads importing the same package at once can meet a half-imported module, so
        # the wait imports nothing but httpx (first), and the flow starts after the thread.
        held.enter_context(fork_server(paths.root))
        importlib.import_module("httpx")
        settled = threading.Event()
        importer = threading.Thread(target=_import_flow, args=(settled,), name="import-flow", daemon=True)
        importer.start()
        server_url = _project_prefect_server(paths, settled=settled.set)
        _interrupt_on_sigterm()
        if server_url:
            held.enter_context(prefect_server.in_use(paths.root))
        importer.join()
        # What is imported now (Prefect, MLflow, DVC) stays for the run: frozen, a full
        # collection during the run walks only what the run made (one took 0.3 s in the
        # middle of a default run; measured with gc.callbacks).
        collector.done()
        result = _run_pipeline(overrides, from_stage, to_stage, force, wait)
    # When evaluate ran, its own closing table (same numbers) is already on the terminal.
    evaluated_now = any(stage["stage"] == "evaluate" and stage["ran"] for stage in result["stages"])
    if result["comparison"] and not evaluated_now:
        console.print(comparison_table(result["comparison"]))
    console.print(f"MLflow pipeline run: {result['mlflow_run_id']}  (see README: MLflow UI)")
    if server_url:
        console.print(f"Prefect UI: {server_url}  (this project's background server; `slimflow prefect-server --stop` stops it)")


def _import_flow(settled: threading.Event) -> None:
    """MLflow and its SQL stores (the flow's first tracking call opens them: 0.6 s of imports),
    then, once ``settled`` says Prefect's settings are final, the flow and Prefect (0.7 s);
    an import that fails is left to the flow, which reports it in its own words."""
    from tasks.core.fork_preload import MLFLOW_SQL_STORES

    try:
        for name in ("mlflow", *MLFLOW_SQL_STORES):
            importlib.import_module(name)
        settled.wait()
        importlib.import_module("flows.pipeline")
    except Exception:  # noqa: BLE001
        return


def _project_prefect_server(paths: ProjectPaths, start: bool = True,
                            settled: Callable[[], None] | None = None) -> str | None:
    """:func:`flows.prefect_server.use`, its errors as one line."""
    try:
        return prefect_server.use(paths.root, start, settled)
    except prefect_server.PrefectServerError as err:
        _fail(str(err), code=1)


@app.command("prefect-server")
def prefect_server_command(
    stop: Annotated[bool, typer.Option("--stop", help="Stop the server (the next run starts it again).")] = False,
) -> None:
    """This project's background Prefect server (its flow runs and their logs in the UI):
    start it if none runs and print its URL, or stop it. It stops by itself after
    SLIMFLOW_PREFECT_IDLE_MINUTES (60) without a run."""
    paths = ProjectPaths.discover()
    if stop:
        console.print("stopped" if prefect_server.stop(paths.root) else "no background Prefect server was running")
        return
    try:
        url = prefect_server.ensure(paths.root).removesuffix("/api")
    except prefect_server.PrefectServerError as err:
        _fail(str(err), code=1)
    console.print(f"Prefect UI: {url}  (history in {os.environ['PREFECT_HOME']}; stops after "
                  f"{prefect_server.idle_minutes():g} idle minutes, or with --stop)")


def _run_pipeline(overrides: list[str], first: str | None, last: str | None, force: bool, wait: float) -> Any:
    """The flow, its failures as one line each."""
    from flows.heartbeat import heartbeats_replaced
    from flows.pipeline import pipeline
    from tasks.core.dvc import PipelineBusy, StageFailed

    if not errors.debug():
        one_line_console_logs()
    try:
        with heartbeats_replaced():  # Prefect's heartbeat thread would hold the run's end up to 1 s
            return pipeline(overrides=overrides, first=first, last=last, force=force, wait_s=wait)
    except PipelineBusy as err:
        _fail(str(err), code=3)
    except StageFailed as err:  # a stage's bad input (a data file, a setting only the data refutes): 2, as the stage
        _fail(f"pipeline failed: {err}", code=2 if err.bad_input else 1)
    except KeyboardInterrupt:
        _end_interrupted_run()
        _fail("pipeline interrupted; the MLflow runs are marked FAILED and no stage output is half-written", code=130)
    except Exception as err:
        _fail(f"pipeline failed: {one_line(err)}", code=1, err=err)


def _end_interrupted_run() -> None:
    """After Ctrl-C or SIGTERM: nothing of the run keeps running, and no MLflow run of it
    stays RUNNING (a stage killed before it could end its own run)."""
    from flows.recovery import end_own_runs
    from tasks.core.processes import kill_marked, owned_token

    if token := owned_token():
        kill_marked(token)
    try:
        end_own_runs(ProjectPaths.discover().root, "interrupted (Ctrl-C, SIGTERM or SIGHUP) while in progress")
    except Exception as err:  # the next start repairs it
        console.print(f"could not mark the interrupted run's MLflow runs FAILED ({one_line(err)}); the next run will",
                      highlight=False, soft_wrap=True)


@app.command()
def serve(
    cron: Annotated[Optional[str], typer.Option(help='Cron schedule, e.g. "0 3 * * *".')] = None,
    interval: Annotated[Optional[int], typer.Option(help="Run every N seconds instead of a cron schedule.")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-S", help="Default parameter overrides for scheduled runs.")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="First stage of each scheduled run.")] = None,
    to_stage: Annotated[Optional[str], typer.Option("--to", help="Last stage of each scheduled run.")] = None,
) -> None:
    """Serve the pipeline as a Prefect deployment on a schedule (on PREFECT_API_URL, else the
    project's background Prefect server)."""
    if (cron is None) == (interval is None):
        _fail("give exactly one of --cron or --interval")
    _check_stage_names(from_stage, to_stage)
    if not os.environ.get("PREFECT_API_URL") and not prefect_server.wanted():
        _fail(
            "scheduled runs need a Prefect server that stays up (the temporary one has no scheduler): "
            f"unset {prefect_server.MODE_ENV} to use the project's background server, or set PREFECT_API_URL"
        )
    overrides = list(set_ or [])
    paths = ProjectPaths.discover()
    _checked_params(paths, overrides)  # every scheduled run would refuse them
    _check_servers()
    # No PREFECT_API_URL: the project's background server, kept from going idle while serving.
    server_url = _project_prefect_server(paths)
    from flows.pipeline import pipeline
    from flows.schedule import serve_deployment
    from tasks.core.processes import own_process_tree

    # The flow-run processes Prefect's runner starts (each in a session of its own, out of
    # reach of Ctrl-C) carry this process's token: they die with it.
    token = own_process_tree()

    deployment = pipeline.to_deployment(
        name=name, cron=cron, interval=interval,
        # A scheduled run queues behind a run in progress instead of overlapping it.
        parameters={"overrides": overrides, "first": from_stage, "last": to_stage, "wait_s": 3600.0},
        description="slimflow pipeline on a schedule",
    )
    trigger = (f"PREFECT_API_URL={server_url}/api " if server_url else "") + f"prefect deployment run 'slimflow-pipeline/{name}'"

    def registered() -> None:
        console.print(f"serving slimflow-pipeline/{name} ({'cron ' + cron if cron else f'every {interval} s'}); Ctrl-C stops"
                      + (f"; Prefect UI: {server_url}" if server_url else ""), highlight=False, soft_wrap=True)
        console.print(f"trigger a run now: {trigger}", highlight=False, soft_wrap=True)

    try:
        with prefect_server.in_use(paths.root) if server_url else contextlib.nullcontext():
            unpaused = serve_deployment(deployment, registered, lambda: _stop_served_runs(paths, token))  # returns on Ctrl-C or SIGTERM
    finally:
        _stop_served_runs(paths, token)
    if unpaused:
        console.print(f"[yellow]warning:[/] the schedule of slimflow-pipeline/{name} could not be paused ({unpaused}): "
                      "pause it in the Prefect UI, or it queues runs nobody serves", highlight=False, soft_wrap=True)
    else:
        console.print(f"schedule of slimflow-pipeline/{name} paused; serve again to resume it", highlight=False, soft_wrap=True)


def _stop_served_runs(paths: ProjectPaths, token: str) -> None:
    """Stop the flow runs still in progress and end their states: Prefect's runner leaves
    them running, in a session of their own, and their flow runs Running."""
    from flows.recovery import repair_stale_runs
    from tasks.core.processes import kill_marked

    if killed := kill_marked(token):
        console.print(f"stopped {killed} process(es) of the flow runs in progress")
    repair_stale_runs(paths.root, note=lambda message: console.print(message, highlight=False, soft_wrap=True))


@app.command()
def status(
    limit: Annotated[int, typer.Option(help="How many recent pipeline runs to list.")] = 5,
    prefect_state: Annotated[bool, typer.Option(help="Also ask Prefect for each flow run's state (starts the temporary API when PREFECT_API_URL is unset, ~15 s).")] = False,
) -> None:
    """The latest pipeline runs (MLflow status, Prefect flow run and state) and the current champion."""
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    import mlflow
    from mlflow import MlflowClient

    from flows.recovery import repair_stale_runs
    from tasks.core import tracking

    _check_servers()
    _project_prefect_server(paths, start=False)  # the project's background server, if it is up
    experiment_id = tracking.configure(paths.root, params.base.experiment)
    # A run whose process died shows as what it is (FAILED), not RUNNING; Prefect's side
    # too when a Prefect server is configured (else the next run does it).
    repair_stale_runs(paths.root, prefect=bool(os.environ.get("PREFECT_API_URL")),
                      note=lambda message: console.print(message, highlight=False, soft_wrap=True))
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string="tags.pipeline = 'slimflow'",
        order_by=["attributes.start_time DESC"], max_results=limit, output_format="list",
    )
    states = _prefect_states([r.data.tags.get("prefect_flow_run_id") for r in runs]) \
        if prefect_state or os.environ.get("PREFECT_API_URL") else {}
    table = Table(title=f"latest pipeline runs ({os.environ['MLFLOW_TRACKING_URI']})")
    for column in ("started", "MLflow status", "MLflow run id", "Prefect flow run", "Prefect state", "stages ran", "error"):
        table.add_column(column)
    import datetime as dt

    for r in runs:
        flow_run = r.data.tags.get("prefect_flow_run_id", "-")
        table.add_row(
            dt.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S"),
            r.info.status, r.info.run_id, flow_run, states.get(flow_run, "-"),
            _stages_ran(r.data.tags), (r.data.tags.get("error") or "")[:60],
        )
    console.print(table)
    client = MlflowClient()
    name = params.evaluate.registered_model
    try:
        version = client.get_model_version_by_alias(name, "champion")
        console.print(f"champion: models:/{name}@champion = version {version.version} "
                      f"({version.tags.get('variant', '?')}, run {version.run_id})")
    except Exception:
        console.print(f"champion: none registered yet under {name!r}")


def _stages_ran(tags: dict[str, str]) -> str:
    """A pipeline run's stages that ran, and those DVC restored from its run cache instead."""
    ran, restored = tags.get("stages_ran", "-"), tags.get("stages_restored", "none")
    return ran if restored == "none" else f"{ran} (restored: {restored})"


def _prefect_states(flow_run_ids: list[str | None]) -> dict[str, str]:
    """Prefect's state name of each flow run (missing ones are left out)."""
    from prefect.client.orchestration import get_client

    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for flow_run_id in filter(None, flow_run_ids):
            try:
                states[flow_run_id] = client.read_flow_run(flow_run_id).state.name
            except Exception:  # a run from another Prefect API (e.g. an earlier temporary one)
                continue
    return states


@app.command()
def report() -> None:
    """The comparison table of the latest evaluated run (metrics/evaluate.json)."""
    from flows.report import comparison_rows, gate_failures

    paths = ProjectPaths.discover()
    rows = comparison_rows(paths)
    if not rows:
        _fail(f"no evaluation found at {paths.metrics / 'evaluate.json'}; run `slimflow run` first", code=1)
    console.print(comparison_table(rows))
    with contextlib.suppress(OSError, ValueError):  # no decision written: the table alone
        decision = json.loads((paths.evaluation / "result.json").read_text())
        for name, reason in gate_failures(decision).items():
            console.print(f"{name} {reason}", markup=False, highlight=False)
        for caveat in (decision.get("caveats") if isinstance(decision, dict) else None) or []:
            console.print(f"caveat: {caveat}", markup=False, highlight=False)
    report_file = paths.evaluation / "report.md"
    if report_file.exists():
        console.print(f"full report: {report_file}")


@app.command()
def params(
    schema: Annotated[bool, typer.Option("--schema", help="Print the JSON schema of params.yaml.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-S", help="Show the result of these overrides.")] = None,
) -> None:
    """Validate params.yaml (with overrides) and print the effective values, or the schema."""
    if schema:
        console.print_json(json.dumps(params_schema()))
        return
    loaded = _checked_params(ProjectPaths.discover(), list(set_ or []))
    console.print_json(loaded.model_dump_json())


def main() -> None:
    """The ``slimflow`` command (the console script; ``python -m flows.cli``)."""
    try:
        app()
    except SystemExit as done:  # every command ends so: the prompt is back 0.8 s sooner after a run
        exit_process(done.code)


if __name__ == "__main__":
    main()
