"""The Mistral upstream, through the official SDK (async).

The SDK has a named argument for every field Mistral documents, and its models keep
only the fields they know, at every level: a field of a newer API, at the top or inside
a message or a tool, would be dropped. So the body the gateway means to send (the
agent's fields, with what governance set: model, max_tokens, tools) also travels in a
private header, and a small transport sends those fields as they are, over the SDK's
serialization of them (which keeps what the SDK adds itself, such as `stream`).

The same transport holds back a request prepared while its call's hold is placed
(routing.prepared): nothing is sent before the plan asks for exactly that request.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import httpx2
from django.conf import settings
from mistralai.client import Mistral

from .transport import DirectAsyncClient, Http11Transport, last_response

AS_SENT_HEADER = "x-governance-as-sent"
SDK_FIELDS = frozenset(
    {
        "model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop",
        "random_seed", "metadata", "response_format", "tools", "tool_choice",
        "presence_penalty", "frequency_penalty", "min_tokens", "repetition_penalty", "top_k",
        "logprobs", "top_logprobs", "prompt_logprobs", "top_prompt_logprobs", "n",
        "prediction", "parallel_tool_calls", "reasoning_effort", "prompt_mode", "guardrails",
        "prompt_cache_key", "service_tier", "safe_prompt",
    }
)  # fmt: skip


# Set in a prepared call's task (routing.prepared): its request waits for this future
# before it is sent, and is never sent if the future fails.
held_back_until: contextvars.ContextVar[asyncio.Future | None] = contextvars.ContextVar(
    "held_back_until", default=None
)


class AsSentTransport(httpx2.AsyncBaseTransport):
    """Sends the fields of the request's private header as they are, over the JSON body
    the SDK serialized, then sends the request through `inner`: once its prepared call
    lets it go, if it has one."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        as_sent = request.headers.get(AS_SENT_HEADER)
        if as_sent is not None:  # done first: a prepared call does it during the hold
            body = {**json.loads(request.content or b"{}"), **json.loads(as_sent)}
            headers = [
                (k, v)
                for k, v in request.headers.multi_items()
                if k.lower() not in (AS_SENT_HEADER, "content-length")
            ]
            request = httpx2.Request(
                request.method,
                request.url,
                headers=headers,
                content=json.dumps(body).encode(),
                extensions=request.extensions,
            )
        gate = held_back_until.get()
        if gate is not None:
            await gate  # a withdrawn call fails here, before anything is sent
            held_back_until.set(None)
        return await self.inner.handle_async_request(request)


def sdk_arguments(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of `body` the SDK takes as arguments (it validates and serializes
    them); request_options(body) has them all sent as they are."""
    return {k: v for k, v in body.items() if k in SDK_FIELDS}


def _cache_sdk_model_classes() -> None:
    """The SDK builds a new pydantic model class (create_model) for every request it
    serializes and every response it parses: about a fifth of the gateway's CPU per
    call. The class depends only on the type being parsed, so build it once per type.
    Any call shape other than the SDK's own goes to pydantic untouched."""
    from mistralai.client.utils import serializers

    original = serializers.create_model
    if getattr(original, "_governance_cached", False):
        return
    classes: dict[tuple[str, object], type] = {}

    def create_model(name, **fields):
        if name not in ("Marshaller", "Unmarshaller") or set(fields) != {"body", "__config__"}:
            return original(name, **fields)
        key = (name, fields["body"])
        try:
            return classes[key]
        except KeyError:
            model = classes[key] = original(name, **fields)
            return model
        except TypeError:  # an unhashable type: no caching
            return original(name, **fields)

    create_model._governance_cached = True  # type: ignore[attr-defined]
    serializers.create_model = create_model


_cache_sdk_model_classes()


def _cache_sdk_type_hints() -> None:
    """The SDK reads a request class's type hints (typing.get_type_hints, which
    evaluates every annotation) each time it builds a request: a tenth of the gateway's
    CPU per call. A class's hints do not change, so read them once per class."""
    from mistralai.client.utils import forms, queryparams, url

    original = typing.get_type_hints
    hints: dict[type, dict] = {}

    def get_type_hints(obj, *args, **kwargs):
        if args or kwargs or not isinstance(obj, type):
            return original(obj, *args, **kwargs)
        try:
            return hints[obj]
        except KeyError:
            found = hints[obj] = original(obj)
            return found

    for module in (forms, queryparams, url):
        module.get_type_hints = get_type_hints


_cache_sdk_type_hints()


def _run_sdk_hooks_inline() -> None:
    """The SDK runs its request hooks (user agent, trace headers, tracing, service-account
    auth, which an API key skips) in a thread, twice per request, in case a hook blocks.
    Its own hooks only touch the request in memory: a thread hop costs more than they
    do, so they run on the event loop. (With service-account auth instead of an API
    key, the token file would be read there too.)"""
    from mistralai.client import basesdk

    async def run_inline(function, *args):
        return function(*args)

    basesdk.run_sync_in_thread = run_inline


_run_sdk_hooks_inline()


def _keep_lazy_sdk_attributes() -> None:
    """The SDK's packages resolve their attributes lazily (PEP 562 __getattr__), and
    never keep them: every `models.X` in a request re-ran import_module, ~30 times per
    call. Keep each attribute on its package once resolved."""
    from mistralai.client import errors, models, utils

    for package in (models, errors, utils):
        resolve = package.__getattr__

        def keep(name, _resolve=resolve, _package=package):
            value = _resolve(name)
            setattr(_package, name, value)
            return value

        package.__getattr__ = keep


_keep_lazy_sdk_attributes()


def _skip_sdk_iterable_coercion() -> None:
    """Before validating request fields, the SDK walks each value against its type to
    turn tuples and generators into lists. Our request bodies come from json.loads, so
    they hold lists already; the walk (a few thousand calls per request) is skipped."""
    from mistralai.client import utils
    from mistralai.client.utils import serializers

    def get_pydantic_model(data, typ):
        if serializers._contains_pydantic_model(data):
            return serializers._coerce_iterables_for_type(data, typ)
        return serializers.unmarshal(data, typ, coerce_iterables=False)

    serializers.get_pydantic_model = get_pydantic_model
    utils.get_pydantic_model = get_pydantic_model


_skip_sdk_iterable_coercion()

_client: Mistral | None = None
_transport: Http11Transport | None = None
_client_lock = threading.Lock()


def client() -> Mistral:
    """One SDK client (and connection pool) per process."""
    global _client, _transport
    with _client_lock:
        if _client is None:
            _transport = Http11Transport(max_connections=2000)
            _client = Mistral(
                api_key=settings.MISTRAL_API_KEY or "simulated",
                server_url=settings.MISTRAL_SERVER_URL,
                timeout_ms=settings.MISTRAL_TIMEOUT_MS,
                async_client=DirectAsyncClient(transport=AsSentTransport(_transport), timeout=None),
            )
        return _client


def _take_transport() -> Http11Transport | None:
    """Forget the client; the next call makes a new one. Returns the old transport."""
    global _client, _transport
    with _client_lock:
        transport, _client, _transport = _transport, None, None
    return transport


async def close_client() -> None:
    """Close the upstream connections (the server's shutdown)."""
    if (transport := _take_transport()) is not None:
        await transport.aclose()


def reset_client() -> None:
    """Forget the client (tests and settings changes); its connections are closed."""
    if (transport := _take_transport()) is not None:
        transport.forget()


def last_json_body() -> bytes | None:
    """The JSON body of the last upstream response in this context, as the upstream
    sent it (decoded, but not parsed and serialized again): for the reply to a plain
    call, right after the SDK returned its parse of it."""
    response = last_response.get()
    if response is None or response.status_code != 200:
        return None
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    return response.content


def request_options(body: dict[str, Any]) -> dict[str, Any]:
    """The SDK call's options that have `body`'s fields sent as they are (AsSentTransport)."""
    return {"http_headers": {AS_SENT_HEADER: json.dumps(body)}}


# --- Circuit breaker ----------------------------------------------------------------


@dataclass
class _Circuit:
    failures: int = 0
    open_until: float = 0.0


@dataclass
class CircuitBreaker:
    """Stops sending to a model that keeps failing, for a while. Per process: each web
    process learns on its own, which is enough to shed load from a failing model."""

    threshold: int
    cooldown_seconds: float
    _circuits: dict[str, _Circuit] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def is_open(self, model: str) -> bool:
        with self._lock:
            circuit = self._circuits.get(model)
            return circuit is not None and circuit.open_until > time.monotonic()

    def record_failure(self, model: str) -> None:
        with self._lock:
            circuit = self._circuits.setdefault(model, _Circuit())
            circuit.failures += 1
            if circuit.failures >= self.threshold:
                circuit.open_until = time.monotonic() + self.cooldown_seconds
                circuit.failures = 0

    def record_success(self, model: str) -> None:
        with self._lock:
            self._circuits.pop(model, None)

    def reset(self) -> None:
        with self._lock:
            self._circuits.clear()


breaker = CircuitBreaker(
    threshold=settings.CIRCUIT_BREAKER_FAILURES,
    cooldown_seconds=settings.CIRCUIT_BREAKER_COOLDOWN_SECONDS,
)
