"""``slimflow champion``: the model behind ``@champion``, and rolling it back.

Both go through MLflow's client (:func:`tasks.evaluation.promotion.describe_champion`,
:func:`tasks.evaluation.promotion.rollback_champion`) on the project's tracking store and
the registered name of ``evaluate.registered_model`` (``--name`` for another). MLflow is
imported inside the commands, so other ``slimflow`` commands do not pay for it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from tasks.core.paths import ProjectPaths
from tasks.core.tables import console as table_console

app = typer.Typer(help="The registered champion: show it, roll it back.", no_args_is_help=True)
console = table_console()
errors = table_console(stderr=True)

NameOption = Annotated[Optional[str], typer.Option("--name", help="Registered model name (default: evaluate.registered_model).")]


def _fail(message: str, code: int = 1) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _registered_name(paths: ProjectPaths, name: str | None) -> str:
    """Point MLflow at the project's store; the registered name to use."""
    from tasks.core import tracking
    from tasks.core.config import ParamsError, load_params

    try:
        params = load_params(paths.params)
    except ParamsError as err:
        _fail(str(err), code=2)
    tracking.configure(paths.root, params.base.experiment)
    return name or params.evaluate.registered_model


def _report_version(paths: ProjectPaths) -> str | None:
    """The champion version the last evaluation's report names (its promotion.json)."""
    try:
        document = json.loads((paths.evaluation / "promotion.json").read_text())
    except (OSError, ValueError):
        return None
    return (document.get("outcome") or {}).get("champion_version")


def _rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    figures = ", ".join(f"{key} {value:.4g}" for key, value in facts["figures"].items()) or "-"
    rows = [
        ("registered model", f"models:/{facts['registered_model']}@champion"),
        ("version", facts["version"]),
        ("variant", f"{facts['variant'] or '?'} ({facts['method'] or '?'})"),
        ("input", facts["input"]),
        ("classes (index = name)", facts["classes"] or "-"),
        ("data digest", facts["data_digest"] or "-"),
        ("data split", facts["data_split"] or "-"),
        ("figures", figures),
        ("promoted", f"{facts['promoted_at']} by pipeline run {facts['pipeline_run_id'] or '-'} "
                     f"(evaluate run {facts['evaluate_run_id'] or '-'}, Prefect flow run "
                     f"{facts['prefect_flow_run_id'] or '-'})"),
        ("model run", facts["model_run_id"] or "-"),
        ("git commit", facts["git_commit"] or "-"),
        ("previous champion", facts["previous_champion"] or "-"),
    ]
    if rollback := facts["rollback"]:
        rows.append(("rolled back to", f"{rollback.get('rolled_back_at', '?')} from version "
                                       f"{rollback.get('rolled_back_from', '?')}: {rollback.get('rollback_reason', '')}"))
    return rows


@app.command()
def show(name: NameOption = None) -> None:
    """The version behind @champion: variant, input, data digest, figures, when and by which run it was promoted."""
    from tasks.evaluation.promotion import describe_champion

    paths = ProjectPaths.discover()
    registered = _registered_name(paths, name)
    facts = describe_champion(registered)
    if facts is None:
        _fail(f"no version of {registered!r} holds @champion yet; `slimflow run` registers one")
    table = Table(title=f"champion of {registered}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for label, value in _rows(facts):
        table.add_row(label, value)
    console.print(table)
    reported = _report_version(paths)
    if reported is not None and reported != facts["version"] and name is None:
        console.print(f"note: the last evaluation's report (artifacts/evaluation/report.md) names version "
                      f"{reported}; the alias has moved since (a rollback, or another project's run)")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded as a tag on both versions.")],
    to: Annotated[Optional[str], typer.Option("--to", help="The version to point @champion at (default: the champion before).")] = None,
    name: NameOption = None,
) -> None:
    """Point @champion back at the previous champion (or --to VERSION), recording the reason."""
    from tasks.evaluation.promotion import RegistryError, rollback_champion
    from tasks.evaluation.registration import registry_lock

    if not reason.strip():
        _fail("--reason must say why", code=2)
    paths = ProjectPaths.discover()
    registered = _registered_name(paths, name)
    try:
        with registry_lock(paths):  # not in the middle of a run's promotion
            done = rollback_champion(registered, reason.strip(), to)
    except RegistryError as err:
        _fail(str(err))
    console.print(f"@champion of {registered}: version {done.from_version} -> {done.to_version} "
                  f"(reason recorded: {done.reason})")
