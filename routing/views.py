"""The gateway agents call: Mistral-compatible chat completions and models.

Views are async so a thousand slow upstream calls need no thousand threads; database
work (the budget engine) runs in a thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx2
from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    IntegrityError,
    close_old_connections,
    connections,
)
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from mistralai.client.errors import MistralError
from pydantic import ValidationError

from budgets import engine, pgloop
from budgets.errors import BudgetExceeded, GovernanceError, InvalidApiKey, InvalidRequest
from budgets.models import ApiKey, HoldStatus, PeriodState
from budgets.money import nanos_to_usd
from governance import logs, metrics
from governance.http import error_details, status_for

from . import gateway, prepared, upstream
from .catalog import ModelSpec, UnknownModel, get_catalog

log = logging.getLogger("governance.gateway")


def _keep_connections() -> None:
    """Each gateway database thread keeps its connection for GATEWAY_DB_CONN_MAX_AGE
    seconds (Django's own request threads connect per request: CONN_MAX_AGE 0). The
    setting is this thread's own: its connection wrapper gets a copy of the settings."""
    for alias in connections:
        wrapper = connections[alias]
        wrapper.settings_dict = {
            **wrapper.settings_dict,
            "CONN_MAX_AGE": settings.GATEWAY_DB_CONN_MAX_AGE,
        }


# Database work of gateway calls runs here, off the event loop. Each thread keeps its own
# connection, so this is also the most connections one web process opens for the gateway.
_db_thread_count = settings.GATEWAY_DB_THREADS
_db_threads = ThreadPoolExecutor(
    max_workers=_db_thread_count, thread_name_prefix="gateway-db", initializer=_keep_connections
)


def in_thread(function):
    """Run a database function in one of the gateway's database threads.

    Calls from concurrent requests run in parallel threads instead of queueing on
    Django's single sync thread. Those threads never see Django's request signals, so
    they tidy their own connections: close_old_connections() drops a broken connection
    and applies the threads' CONN_MAX_AGE, as it would at the end of a request.
    """

    async def call(*args, **kwargs):
        return await asyncio.wrap_future(_submit(function, *args, **kwargs))

    return call


def _submit(function, *args, **kwargs) -> Future:
    """`function` submitted to the database threads, in the caller's context (in_thread)."""
    return _db_threads.submit(contextvars.copy_context().run, _tidied, function, *args, **kwargs)


def _tidied(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    finally:
        close_old_connections()


def close_db_connections() -> None:
    """Close the database connection of every gateway thread (tests; a process that
    ends closes them anyway). One task per thread: each waits for the others, so no
    thread runs two."""
    count = _db_thread_count
    barrier = threading.Barrier(count)

    def close() -> None:
        barrier.wait(timeout=10)
        connections.close_all()

    for future in [_db_threads.submit(close) for _ in range(count)]:
        future.result()
    for database in list(_loop_databases.values()):
        if database is not None:
            database.close()


def new_request_id() -> str:
    return f"gw-{uuid.uuid4().hex}"


async def authenticate(raw_key: str) -> ApiKey:
    """The key from the per-process cache, or from the database in a thread."""
    return gateway.cached_key(raw_key) or await in_thread(gateway.authenticate)(raw_key)


class RequestTooLarge(GovernanceError):
    code = "request_too_large"


class UpstreamUnavailable(GovernanceError):
    code = "upstream_unavailable"


class UpstreamError(Exception):
    """An upstream 4xx, passed through to the agent."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


def error_response(
    code: str, message: str, status: int, request_id: str, details: dict | None = None, headers=None
) -> JsonResponse:
    """Mistral's error shape, plus our code and details (the openai SDK reads `code`)."""
    body = {
        "object": "error",
        "message": message,
        "type": "governance_error" if status != 400 else "invalid_request_error",
        "param": None,
        "code": code,
    }
    if details:
        body["details"] = details
    response = JsonResponse(body, status=status)
    response["X-Request-Id"] = request_id
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def governance_error(error: GovernanceError, request_id: str) -> JsonResponse:
    return error_response(
        error.code, error.message, status_for(error.code), request_id, error_details(error)
    )


def bearer_key(request: HttpRequest) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidApiKey("send the agent's key as 'Authorization: Bearer <key>'")
    return token.strip()


def read_json(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object, refusing wrong types, oversized and malformed bodies."""
    length = request.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > settings.GATEWAY_MAX_BODY_BYTES:
        raise RequestTooLarge(
            f"the request body is larger than {settings.GATEWAY_MAX_BODY_BYTES} bytes"
        )
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise InvalidRequest(
            f"send JSON with Content-Type: application/json (got {content_type or 'none'!r})"
        )
    raw = request.body
    if len(raw) > settings.GATEWAY_MAX_BODY_BYTES:
        raise RequestTooLarge(
            f"the request body is larger than {settings.GATEWAY_MAX_BODY_BYTES} bytes"
        )
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _not_json(name: str) -> None:
    """Python's json reads NaN and Infinity; JSON has neither (the upstream would get
    them as sent)."""
    raise ValueError(f"{name} is not a JSON number")


def upstream_arguments(plan: gateway.CallPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    return _upstream_arguments(plan.body, plan.model, plan.max_tokens)


def _upstream_arguments(
    body: dict[str, Any], model: ModelSpec, max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SDK's arguments, and its request options, for this body on this model."""
    body = {**body, "model": model.upstream_name, "max_tokens": max_tokens}
    body.pop("stream", None)
    return upstream.sdk_arguments(body), upstream.request_options(body)


def _prepared_call(key: ApiKey, body: dict[str, Any]) -> prepared.PreparedCall | None:
    """The upstream call of the common plan (gateway._plain_plan): the model the
    strategy picks, max_tokens as asked. None when no model can be named before the
    plan, or its circuit is open (the plan then falls back)."""
    try:
        requested = gateway.resolve_model(get_catalog(), body["model"])
    except GovernanceError:
        return None
    model = gateway.plain_model(key, body, requested)
    if model is None or upstream.breaker.is_open(model.id):
        return None
    known, options = _upstream_arguments(body, model, gateway.asked_max_tokens(body, model))
    return prepared.PreparedCall(known, options, stream=bool(body.get("stream")))


# On PostgreSQL the common call's two statements go out from the event loop
# (budgets.pgloop): one database per event loop, its connections opened as calls need
# them. Only a server's loop opts in (use_loop_database, at its lifespan's start): a
# loop made for one call (async_to_sync, Django's test client) would leave its
# connections behind it. A loop whose database was closed (shutdown) has None.
_loop_databases: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, pgloop.LoopDatabase | None
] = weakref.WeakKeyDictionary()


def use_loop_database() -> None:
    """For a server, on its event loop at start-up: send the common call's statements
    from this loop (PostgreSQL, unless GATEWAY_LOOP_STATEMENTS is off)."""
    engine_name = connections.settings[DEFAULT_DB_ALIAS]["ENGINE"]
    if settings.GATEWAY_LOOP_STATEMENTS and engine_name == "django.db.backends.postgresql":
        loop = asyncio.get_running_loop()
        if _loop_databases.get(loop) is None:
            _loop_databases[loop] = pgloop.LoopDatabase(
                _db_thread_count, settings.GATEWAY_DB_CONN_MAX_AGE
            )


def _loop_database() -> pgloop.LoopDatabase | None:
    """This event loop's database, if the common call's statements go out from it."""
    return _loop_databases.get(asyncio.get_running_loop())


async def close_loop_database() -> None:
    """Close this event loop's database connections (server shutdown); later statements
    of calls still running go out from the threads."""
    loop = asyncio.get_running_loop()
    database = _loop_databases.get(loop)
    if database is not None:
        _loop_databases[loop] = None
        database.close()


async def _plan(key: ApiKey, body, request_id: str, user_key: str, ready) -> gateway.CallPlan:
    """The call's plan (gateway.plan_call). On PostgreSQL the common call's statement
    goes out from this event loop, and `ready` starts building while it runs; any other
    decision, or the general one after that statement placed no hold, runs in a
    database thread."""
    database = _loop_database()
    call = None
    if database is not None:
        call = gateway.plain_call(key, body, request_id=request_id, user_key=user_key)
    if call is None:
        return await in_thread(_preparing(ready, gateway.plan_call))(
            key, body, request_id=request_id, user_key=user_key
        )
    try:
        hold_id, rows, locked = await database.read_and_hold(
            call.hold, sent=ready.start if ready is not None else None
        )
    except IntegrityError:  # the request id is taken: plan_call says by whom
        return await in_thread(gateway.plan_call)(
            key, body, request_id=request_id, user_key=user_key
        )
    scope, hold = call.hold.outcome(hold_id, rows, locked, database.alias)
    if hold is not None:
        return call.plan(scope, hold)
    return await in_thread(gateway.plan_call)(
        key, body, request_id=request_id, user_key=user_key, read=call.hold, rows=rows
    )


def _preparing(call: prepared.PreparedCall | None, function: Callable) -> Callable:
    """`function`, which first has `call` start building on this event loop, from the
    database thread that runs it (PreparedCall.start says why then)."""
    if call is None:
        return function
    loop = asyncio.get_running_loop()

    def run(*args, **kwargs):
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing to prepare
            loop.call_soon_threadsafe(call.start)
        return function(*args, **kwargs)

    return run


def _sdk_call(
    known: dict[str, Any],
    options: dict[str, Any],
    *,
    stream: bool,
    ready: prepared.PreparedCall | None,
) -> Callable[[], Awaitable[Any]]:
    """The SDK call with these arguments: `ready` if it has exactly them (otherwise the
    view withdraws it once the call is open)."""
    if ready is not None and ready.arguments == (known, options):
        return ready.send
    chat = upstream.client().chat
    function = chat.stream_async if stream else chat.complete_async
    return functools.partial(function, **known, **options)


def _is_upstream_failure(exc: BaseException) -> bool:
    """5xx, timeouts and connection errors: worth a fallback model. A 4xx is the agent's."""
    if isinstance(exc, MistralError):
        return exc.status_code >= 500
    return isinstance(exc, httpx2.TransportError)


def _upstream_4xx(exc: MistralError) -> UpstreamError:
    try:
        body = json.loads(exc.body)
    except (TypeError, ValueError):
        body = {
            "object": "error",
            "message": exc.body or str(exc),
            "type": "upstream_error",
            "code": None,
        }
    return UpstreamError(exc.status_code, body)


async def _next_plan(first, key, original, user_key, tried: set[str], attempt: int):
    """After an upstream failure: the next model of the first plan's fallback chain, in
    its order, not tried yet and with its circuit closed."""
    needed = gateway.required_capabilities(original)
    for candidate in get_catalog().fallbacks(first.model.id, required_capabilities=needed):
        if candidate.id in tried or upstream.breaker.is_open(candidate.id):
            continue
        try:
            return await in_thread(gateway.plan_call)(
                key,
                original,
                request_id=f"{first.request_id}.{attempt}",
                user_key=user_key,
                force_model=candidate.id,
            )
        except GovernanceError:
            continue
    return None


async def _open_upstream(plan, key, original, user_key, *, stream: bool, ready=None, gone=None):
    """Call upstream, falling back along the model's chain on failures. Returns the plan
    that succeeded and the response (or open stream). The first attempt sends `ready`
    (a PreparedCall) if the plan asks for its arguments. Once `gone` (an asyncio.Event)
    is set, the agent has left: a failed attempt is not followed by a fallback. An error
    raised carries the plan of the attempt that met it (`.plan`)."""
    tried: set[str] = set()
    attempt, first_plan = 0, plan
    while True:
        tried.add(plan.model.id)
        first, ready = ready, None  # a fallback's request is its own
        if not upstream.breaker.is_open(plan.model.id):
            known, options = upstream_arguments(plan)
            call = _sdk_call(known, options, stream=stream, ready=first)
            started = time.monotonic()
            try:
                response = await call()
            except ValidationError as exc:
                await in_thread(gateway.void)(plan)
                message = f"the request does not match Mistral's API: {exc.errors()[0]['msg']}"
                raise _met(InvalidRequest(message), plan) from None
            except (MistralError, httpx2.TransportError) as exc:
                await in_thread(gateway.void)(plan)
                if not _is_upstream_failure(exc):
                    raise _met(_upstream_4xx(exc), plan) from None
                upstream.breaker.record_failure(plan.model.id)
                log.warning(
                    "upstream %s failed for %s: %s",
                    plan.model.id,
                    plan.request_id,
                    type(exc).__name__,
                )
            else:
                upstream.breaker.record_success(plan.model.id)
                metrics.observe_upstream_latency(plan.model.id, time.monotonic() - started)
                return plan, response, started
        else:
            await in_thread(gateway.void)(plan)
        if gone is not None and gone.is_set():
            message = "the upstream failed and the agent had left: no fallback"
            raise _met(UpstreamUnavailable(message), plan)
        attempt += 1
        failed, plan = plan, await _next_plan(first_plan, key, original, user_key, tried, attempt)
        if plan is None:
            message = "no model answered: the upstream failed and no fallback was available"
            raise _met(UpstreamUnavailable(message), failed)


def _met(error: Exception, plan: gateway.CallPlan) -> Exception:
    """`error`, marked with the plan of the attempt that met it (its headers, metrics)."""
    error.plan = plan
    return error


def _refusal_headers(error: Exception, plan, original) -> dict[str, str]:
    """The governance headers of a call answered with an error, as far as it got: a
    call planned and then failed upstream has the failed attempt's plan's (its hold
    released); a budget refusal names the model asked for, the refusing budget's state
    (too little left for this call is not always stopped) and what it has left. A call
    refused before its budgets were read (a bad key or body, a paused agent) carries
    only the model asked for, if it is one."""
    if plan is not None:
        headers = gateway.governance_headers(plan, cost_nanos=0)
        del headers["X-Request-Id"]
        return headers
    headers = {}
    asked = original.get("model") if isinstance(original, dict) else None
    if isinstance(asked, str):
        with contextlib.suppress(UnknownModel):
            headers["X-Governance-Model"] = get_catalog().resolve(asked).id
    if isinstance(error, BudgetExceeded):
        left = error.limit_nanos - error.spent_nanos - error.held_nanos
        headers["X-Budget-State"] = error.state or PeriodState.STOPPED
        headers["X-Budget-Remaining-Usd"] = nanos_to_usd(max(0, left))
    return headers


def _used(plan: gateway.CallPlan, response) -> tuple[tuple[int, int], bool]:
    """(prompt, completion) tokens an answered plain call used, and whether they are
    estimated (no usage from upstream: all it could have used)."""
    tokens = _usage_tokens(response.usage)
    if tokens is None:
        return (plan.input_bound, plan.max_tokens), True
    return tokens, False


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _usage_tokens(usage: Any) -> tuple[int, int] | None:
    if usage is None:
        return None
    return int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0)


def _json(model: Any) -> str:
    """The model as the JSON the upstream sent (pydantic serializes it in one step)."""
    return model.model_dump_json(by_alias=True)


def _record_served(plan: gateway.CallPlan, cost_nanos: int | None = None) -> None:
    """Count and log a call that went upstream (a stream's cost is not known yet), under
    the id its reply and ledger row carry (a fallback's is the request's id with the
    attempt appended)."""
    outcome = metrics.Outcome.DOWNGRADED if plan.downgraded_from else metrics.Outcome.ALLOWED
    metrics.count_call(outcome, plan.model.id, downgraded_from=plan.downgraded_from)
    logs.log_gateway_decision(
        plan.request_id,
        outcome,
        key=plan.key,
        model=plan.model.id,
        downgraded_from=plan.downgraded_from,
        status=200,
        cost_nanos=cost_nanos,
    )


def _record_failed(
    request_id: str,
    outcome: str,
    status: int,
    *,
    code: str | None = None,
    key: ApiKey | None = None,
    plan: gateway.CallPlan | None = None,
) -> None:
    """Count and log a call answered with an error (`key` is the key row, never the secret)."""
    model = plan.model.id if plan is not None else None
    metrics.count_call(outcome, model, reason=code)
    logs.log_gateway_decision(request_id, outcome, key=key, model=model, code=code, status=status)


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    request_id = new_request_id()
    try:
        return await _chat_completions(request, request_id)
    except Exception:
        # Agents parse JSON errors; an unexpected failure (the database went away, a bug)
        # is still answered in the upstream's shape, with the id to find it in the logs.
        # A hold it left behind is released by expire_holds.
        log.exception("gateway call %s failed", request_id, extra={"request_id": request_id})
        metrics.count_call(metrics.Outcome.ERROR, None)
        return error_response("internal_error", "the gateway failed; try again", 500, request_id)


async def _chat_completions(request: HttpRequest, request_id: str) -> HttpResponse:
    if request.method != "POST":
        return error_response("method_not_allowed", "use POST", 405, request_id)
    key = plan = original = None
    try:
        key = await authenticate(bearer_key(request))
        original = gateway.validate_chat_request(read_json(request))
        user_key = request.headers.get("X-End-User", "").strip()
        ready = _prepared_call(key, original)
        try:
            planning = asyncio.ensure_future(_plan(key, original, request_id, user_key, ready))
            try:
                plan = await asyncio.shield(planning)
            except asyncio.CancelledError:
                # The agent went away while its hold was being placed: once placed, it
                # is given back, and nothing goes upstream (_void_when_planned).
                _settling_task(_void_when_planned(planning), request_id)
                raise
            stream = bool(original.get("stream"))
            gone = asyncio.Event()
            calling = asyncio.ensure_future(
                _calling(plan, key, original, user_key, stream=stream, ready=ready, gone=gone)
            )
            try:
                plan, response, started, raw = await asyncio.shield(calling)
                upstream.last_response.set(raw)  # for last_json_body()
            except asyncio.CancelledError:
                # The agent went away while the upstream works on its call: the call
                # goes on and is charged for what it used (_abandoned).
                gone.set()  # no fallback after a failure
                _settling_task(_abandoned(calling, plan, ready, stream), request_id)
                ready = None  # the call owns it now
                raise
        finally:
            if ready is not None:
                ready.withdraw()  # unless sent: refused, another plan, the agent gone
    except GovernanceError as exc:
        plan = getattr(exc, "plan", None) or plan  # the attempt that met it
        outcome, status = metrics.outcome_of_error(exc.code), status_for(exc.code)
        _record_failed(request_id, outcome, status, code=exc.code, key=key, plan=plan)
        reply = governance_error(exc, request_id)
        for name, value in _refusal_headers(exc, plan, original).items():
            reply[name] = value
        return reply
    except UpstreamError as exc:
        plan = getattr(exc, "plan", None) or plan
        _record_failed(request_id, metrics.Outcome.UPSTREAM_ERROR, exc.status, key=key, plan=plan)
        reply = JsonResponse(exc.body, status=exc.status, safe=False)
        reply["X-Request-Id"] = request_id
        for name, value in _refusal_headers(exc, plan, original).items():
            reply[name] = value
        return reply
    if original.get("stream"):
        return _streaming_response(plan, response, started)  # counted once charged
    tokens, estimated = _used(plan, response)
    # The task starts only once this view awaits or returns: the reply is built first,
    # and a failure to build it still leaves the call charged.
    task = _settling_task(
        _charge(plan, tokens, estimated=estimated, latency_ms=_ms_since(started)),
        plan.request_id,
    )
    reply = HttpResponse(
        upstream.last_json_body() or _json(response), content_type="application/json"
    )
    cost_nanos = gateway.cost_of(plan, *tokens)
    for name, value in gateway.governance_headers(plan, cost_nanos).items():
        reply[name] = value
    after_reply = _after_reply.get()
    if after_reply is None:
        # Django's own handler cancels the view when the agent disconnects; the
        # upstream has answered, so the charge goes on regardless.
        await asyncio.shield(task)
    else:
        after_reply.append(task)
    return reply


# A plain call's charge can go out after its reply: the hold keeps the budget from being
# spent twice meanwhile, and the agent waits for neither the capture's round trip nor the
# log line. The server that sends the reply (governance.asgi.GatewayHandler) opts in with
# charge_after_reply() and, once the reply is sent, waits for the charges the view left.
# Under any other server (Django's own handler, the test client) the charge comes first.
_after_reply: contextvars.ContextVar[list[asyncio.Task] | None] = contextvars.ContextVar(
    "after_reply", default=None
)
_settling: set[asyncio.Task] = set()  # charges after replies, still running
CHARGE_ATTEMPTS = 3
CHARGE_RETRY_SECONDS = 0.05  # then doubled: the database is given ~0.15 s to come back


def charge_after_reply() -> None:
    """For the server, before it calls the view: charge this call after its reply."""
    _after_reply.set([])


def charges_after_reply() -> list[asyncio.Task]:
    """For the server, once the reply is sent: the charges still to wait for."""
    return _after_reply.get() or []


def _settling_task(charge, request_id: str) -> asyncio.Task:
    task = asyncio.get_running_loop().create_task(charge, name=request_id)
    _settling.add(task)
    task.add_done_callback(_settled)
    return task


def _settled(task: asyncio.Task) -> None:
    """Each settling task logs its own outcome; one that raised anyway is logged here,
    not left to asyncio's "never retrieved"."""
    _settling.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("settling gateway call %s failed", task.get_name(), exc_info=task.exception())


def wait_for_charges(timeout: float = 10) -> None:
    """Block until every call answered so far is charged (tests, from outside the
    server's event loop: a reply can reach the agent before its ledger row exists)."""
    deadline = time.monotonic() + timeout
    while _settling:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(_settling)} charges still running after {timeout} s")
        time.sleep(0.002)


async def settle_charges(timeout: float) -> None:
    """For shutdown: wait up to `timeout` seconds for the charges still running, and
    name those that did not finish (each then logs what its call used; see _charge)."""
    pending = set(_settling)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=timeout)
    if pending:
        log.error(
            "%s answered calls were still being charged at shutdown: %s",
            len(pending),
            ", ".join(sorted(task.get_name() for task in pending)),
        )


async def _charge(plan, tokens: tuple[int, int], *, estimated: bool, latency_ms: int) -> None:
    """Capture a plain call, then count and log it. The upstream has answered, so a
    failure never withholds the answer: a database error is retried (capture is
    idempotent by request id), and after the last attempt the call is logged with what
    it used, and its hold stays until expire_holds releases it."""
    attempt, charged = 1, None  # charged: the ledger row, once a capture committed
    while True:
        capture = _Capture(plan, tokens, estimated, latency_ms)
        try:
            entry = await capture.run()
            break
        except asyncio.CancelledError:
            # Cancelled (at shutdown, once settle_charges gave up): a capture not yet
            # sent is cancelled with us; one already sent finishes in a thread.
            capture.cut_off(charged)
            raise
        except DatabaseError as exc:
            charged = capture.charged or getattr(exc, "charged_entry", None) or charged
            if attempt == CHARGE_ATTEMPTS:
                _charge_failed(plan, tokens, "not charged", exc, charged)
                return
            log.warning(
                "charging gateway call %s failed (attempt %s of %s), retrying: %s",
                plan.request_id,
                attempt,
                CHARGE_ATTEMPTS,
                exc,
                extra={"request_id": plan.request_id},
            )
        except Exception as exc:
            charged = capture.charged or getattr(exc, "charged_entry", None) or charged
            _charge_failed(plan, tokens, "not charged", exc, charged)
            return
        try:
            await asyncio.sleep(CHARGE_RETRY_SECONDS * 2 ** (attempt - 1))
        except asyncio.CancelledError:
            _charge_failed(plan, tokens, "not charged (cut off by shutdown)", None, charged)
            raise
        attempt += 1
    _charged(plan, entry)


class _Capture:
    """One attempt at capturing an answered call, and what shutdown finds of it.

    On PostgreSQL a call still held is captured in one statement sent from the event
    loop (budgets.pgloop); its threshold events, when it crossed one, and every other
    capture are written in a database thread (gateway.capture)."""

    def __init__(self, plan, tokens: tuple[int, int], estimated: bool, latency_ms: int) -> None:
        self.plan, self.tokens = plan, tokens
        self.estimated, self.latency_ms = estimated, latency_ms
        self.charged = None  # the ledger row, once its statement committed
        self.late: Future | None = None  # a capture going on in a thread
        self.events: Future | None = None  # the threshold events being written

    async def run(self):
        database = _loop_database()
        hold = self.plan.hold
        if database is None or hold.status != HoldStatus.HELD:
            return await self._in_thread()
        entry = engine.held_ledger_entry(hold, *self.tokens, self.estimated, self.latency_ms)
        result = await database.capture(
            hold, entry, timezone.now(), functools.partial(self._finish_in_thread, entry)
        )
        if result is None:  # no longer held: the general way tells what happened
            return await self._in_thread()
        entry_id, changes = result
        engine.captured(hold, entry, entry_id, database.alias)
        self.charged = entry
        if engine.has_transitions(changes):
            self.events = _submit(engine.record_transitions, changes)
            await asyncio.wrap_future(self.events)
        return entry

    async def _in_thread(self):
        self.late = _submit(self._capture)
        return await asyncio.wrap_future(self.late)

    def _capture(self):
        return gateway.capture(
            self.plan,
            prompt_tokens=self.tokens[0],
            completion_tokens=self.tokens[1],
            usage_estimated=self.estimated,
            latency_ms=self.latency_ms,
        )

    def _finish_in_thread(self, entry, finish) -> None:
        """The loop's statement was sent when shutdown cut the call off: a thread waits
        for its answer (finish), and completes the capture as run() would have."""

        def complete():
            result = finish()
            if result is None:
                return self._capture()
            entry_id, changes = result
            engine.captured(self.plan.hold, entry, entry_id, DEFAULT_DB_ALIAS)
            try:
                engine.record_transitions(changes)
            except Exception as exc:
                exc.charged_entry = entry  # committed: _charged_late says so
                raise
            return entry

        try:
            self.late = _submit(complete)
        except RuntimeError as exc:  # the threads are gone (the process is ending)
            self.late = Future()
            self.late.set_exception(pgloop.OutcomeUnknown(str(exc)))

    def cut_off(self, charged) -> None:
        """Shutdown cancelled this capture: say what became of the call (`charged`: the
        ledger row an earlier attempt committed, if one did)."""
        plan, tokens = self.plan, self.tokens
        charged = self.charged or charged
        if charged is not None and self.events is not None and self.events.cancelled():
            _events_missing(plan, charged)
        elif charged is not None:  # committed; its events may still be being written
            _charged(plan, charged)
        elif self.late is not None and not self.late.cancelled():
            self.late.add_done_callback(functools.partial(_charged_late, plan, tokens))
        else:
            _charge_failed(plan, tokens, "not charged (cut off by shutdown)")


def _charged(plan, entry) -> None:
    try:
        metrics.add_spend(plan.model.id, entry.cost_nanos)
        _record_served(plan, entry.cost_nanos)
    except Exception:  # the ledger has it; only its metric or log line is missing
        log.exception("gateway call %s was charged but not counted", plan.request_id)


def _charged_late(plan, tokens: tuple[int, int], capture: Future) -> None:
    """A capture that went on in a thread after shutdown cut its call off (it had
    started, or been sent to the database, so it was not cancelled)."""
    exc = capture.exception()
    if exc is None:
        _charged(plan, capture.result())
    elif isinstance(exc, pgloop.OutcomeUnknown):
        log.error(
            "gateway call %s was answered, and its capture was sent but got no answer: "
            "check the ledger for %s before charging %s prompt and %s completion tokens on "
            "%s by hand (until it is charged its hold stays, then expires)",
            plan.request_id,
            plan.request_id,
            tokens[0],
            tokens[1],
            plan.model.id,
            exc_info=exc,
            extra={"request_id": plan.request_id},
        )
        metrics.count_uncharged(plan.model.id)
        _record_served(plan)
    else:
        _charge_failed(plan, tokens, "not charged", exc, getattr(exc, "charged_entry", None))


def _events_missing(plan, entry, exc: BaseException | None = None) -> None:
    """A call charged (`entry`) whose threshold events were not written."""
    log.error(
        "gateway call %s was charged, but its budgets' threshold events may be missing",
        plan.request_id,
        exc_info=exc,
        extra={"request_id": plan.request_id},
    )
    _charged(plan, entry)


def _charge_failed(
    plan,
    tokens: tuple[int, int],
    what: str,
    exc: BaseException | None = None,
    charged=None,
) -> None:
    """Log (at ERROR) and count a call whose charge failed. `charged`: its ledger row,
    if a capture committed it but what came after (its threshold events) failed."""
    if charged is not None:
        _events_missing(plan, charged, exc)
        return
    request_id = plan.request_id
    log.error(
        "gateway call %s was answered but %s: %s prompt and %s completion tokens on %s; "
        "its hold stays until it expires",
        request_id,
        what,
        tokens[0],
        tokens[1],
        plan.model.id,
        exc_info=exc,
        extra={"request_id": request_id},
    )
    try:
        metrics.count_uncharged(plan.model.id)
        _record_served(plan)
    except Exception:
        log.exception("gateway call %s could not be counted", request_id)


def _streaming_response(plan: gateway.CallPlan, stream, started: float) -> StreamingHttpResponse:
    async def events():
        seen_bytes = 0
        usage = None
        settled = False
        try:
            async for event in stream:
                chunk = event.data
                for choice in chunk.choices or []:
                    content = getattr(choice.delta, "content", None)
                    if isinstance(content, str):
                        seen_bytes += len(content.encode())
                if chunk.usage is not None:
                    usage = chunk.usage
                yield f"data: {_json(chunk)}\n\n".encode()
            # Charge before [DONE], so an agent that saw the end sees its ledger row.
            settled = True
            await asyncio.shield(_settle(plan, stream, usage, seen_bytes, started))
            yield b"data: [DONE]\n\n"
        except (MistralError, httpx2.TransportError) as exc:
            log.warning("upstream stream %s broke: %s", plan.request_id, type(exc).__name__)
            settled = True
            await asyncio.shield(_settle(plan, stream, None, seen_bytes, started))
            error = {
                "object": "error",
                "message": "the upstream stream was interrupted",
                "code": "upstream_unavailable",
            }
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            if not settled:
                # The agent went away (the task is cancelled) or the generator was
                # closed early: stop reading upstream and charge what was used.
                await asyncio.shield(_settle(plan, stream, None, seen_bytes, started))

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    for name, value in gateway.governance_headers(plan).items():
        response[name] = value
    return response


async def _void_when_planned(planning: asyncio.Future) -> None:
    """A call whose agent left while it was being planned: its hold, once placed, is
    voided (the upstream is never asked)."""
    try:
        plan = await planning
    except GovernanceError:
        return  # refused: nothing was held
    except Exception:
        log.exception("planning a call whose agent left failed")
        return
    for attempt in range(1, CHARGE_ATTEMPTS + 1):
        try:
            await in_thread(gateway.void)(plan)
            break
        except Exception:
            if attempt == CHARGE_ATTEMPTS:
                log.exception(
                    "gateway call %s: the agent left and its hold could not be voided; "
                    "expire_holds will release it",
                    plan.request_id,
                    extra={"request_id": plan.request_id},
                )
                return
            await asyncio.sleep(CHARGE_RETRY_SECONDS * 2 ** (attempt - 1))
    log.info(
        "gateway call %s: the agent left before the upstream was asked; its hold voided",
        plan.request_id,
        extra={"request_id": plan.request_id},
    )


async def _calling(*args, **kwargs):
    """_open_upstream, run as a task of its own (the agent hanging up does not cancel
    it), and the upstream's raw response it read, for the caller's context."""
    plan, response, started = await _open_upstream(*args, **kwargs)
    return plan, response, started, upstream.last_response.get()


async def _abandoned(calling: asyncio.Future, first, ready, stream: bool) -> None:
    """A call whose agent hung up while the upstream had it: the upstream may already
    be generating (and billing) its answer, so it is charged for what it used, as
    though the agent were still there. A plain call is waited for and captured from its
    usage; a stream is closed as soon as it opens and charged for its prompt. A call
    the upstream failed was voided on the way, with no fallback (_open_upstream).
    `first` is the call's first plan."""
    try:
        plan, response, started, _ = await calling
    except asyncio.CancelledError:  # shutdown gave up waiting for the upstream
        _charge_failed(
            first, (first.input_bound, first.max_tokens),
            "not charged (the agent had left; cut off by shutdown while the upstream had it)",
        )  # fmt: skip
        raise
    except (GovernanceError, UpstreamError) as exc:
        log.info("a call whose agent left failed upstream (its holds voided): %s", exc)
        return
    except Exception:
        log.exception("a call whose agent left failed")
        return
    finally:
        if ready is not None:
            ready.withdraw()
    log.info(
        "gateway call %s: the agent left before the answer; charged for what it used",
        plan.request_id,
        extra={"request_id": plan.request_id},
    )
    if stream:
        await _settle(plan, response, None, 0, started)  # nothing read: its prompt
        return
    tokens, estimated = _used(plan, response)
    await _charge(plan, tokens, estimated=estimated, latency_ms=_ms_since(started))


async def _settle(plan, stream, usage, seen_bytes: int, started: float) -> None:
    """Close a stream and charge it (as _charge does: retried, then counted and logged,
    or logged as not charged)."""
    try:
        await stream.close()
    except Exception:  # closing a broken stream must not stop the capture
        log.debug("closing upstream stream %s failed", plan.request_id, exc_info=True)
    tokens = _usage_tokens(usage)
    estimated = tokens is None
    if tokens is None:
        # No usage from upstream: the whole prompt bound, and every byte of content seen
        # as a token (a token is at least a byte), never more than max_tokens.
        tokens = (plan.input_bound, min(seen_bytes, plan.max_tokens))
    await _charge(plan, tokens, estimated=estimated, latency_ms=_ms_since(started))


async def list_models(request: HttpRequest) -> HttpResponse:
    request_id = new_request_id()
    try:
        await authenticate(bearer_key(request))
    except GovernanceError as exc:
        return governance_error(exc, request_id)
    catalog = get_catalog()
    data = [
        {
            "id": spec.id,
            "object": "model",
            "owned_by": "mistralai",
            "aliases": list(spec.aliases),
            "max_context_length": spec.context_window,
            "max_output_tokens": spec.max_output_tokens,
            "capabilities": sorted(spec.capabilities),
            "pricing": {
                "input_usd_per_million": str(spec.input_usd_per_million),
                "output_usd_per_million": str(spec.output_usd_per_million),
                "source": spec.price_source,
                "as_of": str(spec.price_date),
            },
        }
        for spec in catalog.models.values()
    ]
    response = JsonResponse({"object": "list", "data": data})
    response["X-Request-Id"] = request_id
    return response
