"""The upstream request of a call, built while the call's hold is placed.

Building a request through the SDK (its pydantic models and serialization) costs about
as much as the hold's database round trip, and the event loop is idle during that
round trip. So the gateway guesses the request of the common plan (the model the
strategy picks, max_tokens as asked) and has the SDK build it meanwhile; the transport
holds it back (routing.upstream.held_back_until). Once the plan is known it is sent if
the plan asks for exactly its arguments, and withdrawn otherwise: a refused,
downgraded or clamped call, or an agent gone, never lets it out. (bench/RESULTS.md,
session 7: about half a millisecond less per call at one client.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from pydantic import ValidationError

from . import upstream
from .transport import last_response

log = logging.getLogger("governance.gateway")

TASK_NAME = "prepared upstream call"


class Withdrawn(Exception):
    """Raised at the transport for a prepared request the plan did not ask for. An
    exception, not a cancellation: the SDK's error hooks (its tracing span) see it."""


class PreparedCall:
    """One SDK call, built now and sent only when `send()` lets it go."""

    def __init__(self, known: dict[str, Any], options: dict[str, Any], *, stream: bool) -> None:
        self.arguments = (known, options)
        self._stream = stream
        self._withdrawn = False
        self._gate: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin building, on the event loop. Best called once the hold's database
        thread runs: the thread then takes the interpreter first and its statement is
        on its way while the SDK builds (started before, the build would delay it)."""
        if self._task is not None or self._withdrawn:
            return
        loop = asyncio.get_running_loop()
        self._gate = loop.create_future()
        self._task = loop.create_task(self._call(), name=TASK_NAME)
        # Not a bound method: the finished task keeps no reference back to this call.
        self._task.add_done_callback(functools.partial(_finished, self._gate))

    async def _call(self) -> tuple[Any, Any] | None:
        if self._withdrawn:
            return None  # withdrawn before this task ran: nothing to build
        upstream.held_back_until.set(self._gate)  # this task's own context
        chat = upstream.client().chat
        known, options = self.arguments
        call = chat.stream_async if self._stream else chat.complete_async
        response = await call(**known, **options)
        return response, last_response.get()

    async def send(self) -> Any:
        """Let the request go and wait for the upstream's answer (or open stream), as
        the SDK call returns it; the SDK's errors are raised here."""
        if self._withdrawn:
            raise RuntimeError("a withdrawn call cannot be sent")
        self.start()
        self._gate.set_result(None)
        response, raw = await self._task
        last_response.set(raw)
        return response

    def withdraw(self) -> None:
        """Never send it: the plan asks for something else, or there is no plan. Does
        nothing once sent."""
        if self._withdrawn or (self._gate is not None and self._gate.done()):
            return
        self._withdrawn = True
        if self._gate is not None:
            self._gate.set_exception(Withdrawn())
            self._gate.exception()  # marked seen: a task that never reached it won't ask


def _finished(gate: asyncio.Future, task: asyncio.Task) -> None:
    """A sent call's outcome is send()'s. A withdrawn one's (its gate failed) is
    nobody's: expected are Withdrawn and a request the SDK refused to build; anything
    else is logged."""
    if task.cancelled():
        return
    exc = task.exception()
    withdrawn = gate.done() and not gate.cancelled() and gate.exception() is not None
    if withdrawn and exc is not None and not isinstance(exc, Withdrawn | ValidationError):
        log.warning("a withdrawn upstream call failed", exc_info=exc)
