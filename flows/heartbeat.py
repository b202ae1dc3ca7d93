"""Prefect's flow-run heartbeats for ``slimflow run``, without the wait at the end of every run.

Prefect's engine sends a ``prefect.flow-run.heartbeat`` event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by default; automations use the events
to find flow runs whose process died) from a thread that sleeps in 1 s steps, and joins
that thread when the flow run ends: 0-1 s added to every run (0.6-0.75 s in a traced
default run, where nothing else was left to do).

``slimflow run`` sends the same events, at the same frequency, from a thread that stops at
once: :func:`heartbeats_replaced` around the flow call turns Prefect's own off for that
call, and :func:`flow_run_heartbeats` in the flow sends them. Flow runs started any other
way (a deployment's worker, ``slimflow serve``) keep Prefect's own: there the flow's
block does nothing. ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` set by the user applies to both.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

EVENT = "prefect.flow-run.heartbeat"  # what Prefect's engine sends, and automations look for
_every_s: float | None = None  # set while :func:`heartbeats_replaced` holds Prefect's off


@contextlib.contextmanager
def heartbeats_replaced() -> Iterator[None]:
    """Around a flow call in this process: Prefect's heartbeat thread off, and the flow's
    :func:`flow_run_heartbeats` on at Prefect's configured frequency (off if that is unset)."""
    global _every_s
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    every_s = get_current_settings().flows.heartbeat_frequency
    if every_s is None:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        _every_s = float(every_s)
        try:
            yield
        finally:
            _every_s = None


@contextlib.contextmanager
def flow_run_heartbeats() -> Iterator[None]:
    """In the flow: the current flow run's heartbeat event now and every interval until the
    block ends, when :func:`heartbeats_replaced` turned Prefect's off; otherwise nothing."""
    every_s = _every_s
    if every_s is None:
        yield
        return
    from prefect.context import get_run_context
    from prefect.events import emit_event

    resource, related = _heartbeat_resources(get_run_context())
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                emit_event(event=EVENT, resource=resource, related=related)
            except Exception as err:  # noqa: BLE001 - a missed heartbeat is not the run's failure
                log.debug("flow-run heartbeat not sent: %s", err)
            if stop.wait(every_s):
                return

    # The thread sees this thread's Prefect settings (its API URL among them), as Prefect's does.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,),
                              name="flow-run-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


def _heartbeat_resources(context: Any) -> tuple[dict[str, str], list[Any]]:
    """The event's resource (the flow run) and related resources (its flow, deployment and
    tags), as Prefect's engine describes them."""
    import prefect
    from prefect.events.related import tags_as_related_resources
    from prefect.events.schemas.events import RelatedResource

    flow_run = context.flow_run
    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.name": flow_run.name or "", "prefect.version": prefect.__version__}
    related = []
    if flow_run.flow_id:
        related.append(RelatedResource.model_validate({
            "prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
            "prefect.resource.name": context.flow.name if context.flow else ""}))
    if flow_run.deployment_id:
        related.append(RelatedResource.model_validate({
            "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
            "prefect.resource.role": "deployment"}))
    return resource, related + tags_as_related_resources(set(flow_run.tags or []))
