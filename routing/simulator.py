"""A Mistral-API-compatible simulator for demos, tests and benchmarks.

A plain ASGI application (no framework) answering `POST /v1/chat/completions` (plain and
streaming) and `GET /v1/models` in Mistral's shapes, with deterministic lorem text, token
counts the gateway can bound, settable latency and injected failures.

Token rule (`count_prompt_tokens`): each message costs ceil(characters of its text / 4)
plus MESSAGE_OVERHEAD_TOKENS (4), where its text is its string content or the `text` of its
`{"type": "text"}` chunks; other chunks (images, documents, thinking), tool call arguments
and tool definitions cost nothing. Since a character is at least one UTF-8 byte,
prompt_tokens <= UTF-8 bytes of all message texts + 4 * number of messages.
Completion tokens are words: one word is one token and one stream chunk.

Per-request controls (headers, override the constructor options):
    X-Sim-Status: 503            answer that status with a Mistral-shaped error body
    X-Sim-Latency-Ms: 3000       wait before the first byte
    X-Sim-Token-Latency-Ms: 50   wait between stream chunks
    X-Sim-Cut-After: 5           streaming: send 5 content chunks, then drop the connection
    X-Sim-No-Usage: 1            streaming: no usage in the last chunk (still ends with [DONE])
    X-Sim-Completion-Tokens: 40  completion length before max_tokens applies (instead of 20-200)
Cut-after, no-usage and token latency only affect streams. The 401 body is Mistral's
current `{"detail": "Unauthorized"}`; other errors use `{"object": "error", "message", "type",
"param", "code"}`, and 422 nests pydantic-style `{"detail": [...]}` under `message`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import uvicorn

Scope = dict[str, Any]
Event = dict[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[Event], Awaitable[None]]

MESSAGE_OVERHEAD_TOKENS = 4
CHARS_PER_TOKEN = 4
MIN_COMPLETION_TOKENS = 20
MAX_COMPLETION_TOKENS = 200
ROLES = frozenset({"system", "user", "assistant", "tool"})

LOREM_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure "
    "in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
    "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
    "laborum budget invoice tenant ledger agent spend"
)
LOREM = tuple(LOREM_TEXT.split())


@dataclass(frozen=True)
class ModelSpec:
    id: str
    alias: str
    max_context_length: int
    vision: bool = True
    reasoning: bool = False
    completion_fim: bool = False


# Dated aliases and context lengths are best-effort data for demos, not a price catalog.
MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("mistral-large-latest", "mistral-large-2512", 262_144),
    ModelSpec("mistral-medium-latest", "mistral-medium-2508", 131_072),
    ModelSpec("mistral-small-latest", "mistral-small-2506", 131_072),
    ModelSpec("ministral-8b-latest", "ministral-8b-2512", 262_144),
    ModelSpec("ministral-3b-latest", "ministral-3b-2512", 262_144),
    ModelSpec("codestral-latest", "codestral-2508", 262_144, vision=False, completion_fim=True),
    ModelSpec("magistral-medium-latest", "magistral-medium-2509", 131_072, reasoning=True),
    ModelSpec("pixtral-large-latest", "pixtral-large-2411", 131_072),
)
KNOWN_MODEL_NAMES = frozenset(name for m in MODELS for name in (m.id, m.alias))

# (type, code) per status; the message defaults to the HTTP reason phrase.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    402: ("payment_required", None),
    403: ("forbidden", None),
    404: ("not_found", None),
    422: ("invalid_request_error", None),
    429: ("rate_limited", "1300"),
    500: ("internal_server_error", None),
    502: ("bad_gateway", None),
    503: ("service_unavailable", None),
    504: ("gateway_timeout", None),
}
ERROR_MESSAGES = {429: "Requests rate limit exceeded", 500: "Internal server error"}


class StreamCut(Exception):
    """Raised to make uvicorn drop the connection mid-stream, as a failing upstream would."""


class _HideStreamCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


def hide_stream_cut_tracebacks() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideStreamCuts) for f in logger.filters):
        logger.addFilter(_HideStreamCuts())


# --- tokens and text ------------------------------------------------------------------


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            chunk["text"]
            for chunk in content
            if isinstance(chunk, Mapping)
            and chunk.get("type") == "text"
            and isinstance(chunk.get("text"), str)
        )
    return ""


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(
        math.ceil(len(message_text(m)) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS
        for m in messages
    )


def request_seed(model: str, messages: Sequence[Mapping[str, Any]]) -> int:
    canonical = json.dumps([model, messages], sort_keys=True, ensure_ascii=False, default=str)
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")


def natural_length(seed: int) -> int:
    span = MAX_COMPLETION_TOKENS - MIN_COMPLETION_TOKENS + 1
    return MIN_COMPLETION_TOKENS + seed % span


def lorem_words(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words: list[str] = []
    sentence_start = True
    for _ in range(count):
        word = rng.choice(LOREM)
        word = word.capitalize() if sentence_start else word
        sentence_start = rng.random() < 0.12
        words.append(word + "." if sentence_start else word)
    if words and not words[-1].endswith("."):
        words[-1] += "."
    return words


def stream_pieces(words: Sequence[str]) -> list[str]:
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


# --- request handling -----------------------------------------------------------------


@dataclass(frozen=True)
class Controls:
    status: int | None
    latency_ms: int
    token_latency_ms: int
    cut_after: int | None
    no_usage: bool
    completion_tokens: int | None


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    created: int
    prompt_tokens: int
    words: list[str]
    finish_reason: str

    @property
    def usage(self) -> dict[str, int]:
        completion_tokens = len(self.words)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    disconnected: asyncio.Event

    async def pause(self, milliseconds: int) -> bool:
        """Sleep, cut short if the client goes away; False means it went away."""
        if milliseconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), milliseconds / 1000)
        return not self.disconnected.is_set()


class ErrorResponse(Exception):
    """An error answer decided before the response started."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    if status == 401:
        return {"detail": "Unauthorized"}
    kind, code = ERROR_KINDS.get(status, ("api_error", None))
    if message is None:
        message = ERROR_MESSAGES.get(status) or _reason(status)
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _int_header(headers: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = headers.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ErrorResponse(400, error_body(400, f"{name}: expected a non-negative integer"))
    return number


def parse_controls(
    headers: Mapping[str, str],
    latency_ms: int,
    token_latency_ms: int,
    cut_after: int | None = None,
    no_usage: bool = False,
) -> Controls:
    status = _int_header(headers, "x-sim-status", None)
    if status is not None and not 400 <= status <= 599:
        raise ErrorResponse(400, error_body(400, "x-sim-status: expected a status in 400-599"))
    return Controls(
        status=status,
        latency_ms=_int_header(headers, "x-sim-latency-ms", latency_ms) or 0,
        token_latency_ms=_int_header(headers, "x-sim-token-latency-ms", token_latency_ms) or 0,
        cut_after=_int_header(headers, "x-sim-cut-after", cut_after),
        no_usage=headers.get("x-sim-no-usage", "1" if no_usage else "0") not in ("", "0", "false"),
        completion_tokens=_int_header(headers, "x-sim-completion-tokens", None),
    )


def is_authorized(headers: Mapping[str, str]) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def parse_json(raw_body: bytes) -> Any:
    try:
        return json.loads(raw_body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ErrorResponse(400, error_body(400, f"Invalid JSON body: {exc}")) from exc


def _problem(kind: str, loc: list[Any], msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": value}


def _message_problems(index: int, message: Any) -> list[dict[str, Any]]:
    loc: list[Any] = ["messages", index]
    if not isinstance(message, dict):
        return [_problem("model_type", loc, "Input should be an object", message)]
    problems = []
    if message.get("role") not in ROLES:
        allowed = ", ".join(sorted(ROLES))
        msg = f"Input should be one of {allowed}"
        problems.append(_problem("literal_error", [*loc, "role"], msg, message.get("role")))
    content = message.get("content")
    if not (content is None or isinstance(content, str | list)):
        msg = "Input should be a valid string or list of chunks"
        problems.append(_problem("string_type", [*loc, "content"], msg, content))
    return problems


def validation_problems(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        return [_problem("model_type", [], "Input should be an object", body)]
    problems = []
    if not isinstance(body.get("model"), str) or not body["model"]:
        problems.append(_problem("missing", ["model"], "Field required", body.get("model")))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        msg = "Field required: a non-empty list of messages"
        problems.append(_problem("missing", ["messages"], msg, messages))
    else:
        for index, message in enumerate(messages):
            problems += _message_problems(index, message)
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 0):
        msg = "Input should be a non-negative integer"
        problems.append(_problem("int_type", ["max_tokens"], msg, max_tokens))
    if not isinstance(body.get("stream", False), bool):
        msg = "Input should be a valid boolean"
        problems.append(_problem("bool_type", ["stream"], msg, body["stream"]))
    return problems


def parse_chat_request(raw_body: bytes) -> dict[str, Any]:
    body = parse_json(raw_body)
    problems = validation_problems(body)
    if problems:
        raise ErrorResponse(422, {**error_body(422), "message": {"detail": problems}})
    return body


def build_completion(body: Mapping[str, Any], forced_length: int | None) -> Completion:
    model, messages = body["model"], body["messages"]
    seed = request_seed(model, messages)
    length = natural_length(seed) if forced_length is None else forced_length
    max_tokens = body.get("max_tokens")
    cut = max_tokens is not None and max_tokens < length
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        created=int(time.time()),
        prompt_tokens=count_prompt_tokens(messages),
        words=lorem_words(seed, length)[: max_tokens if cut else length],
        finish_reason="length" if cut else "stop",
    )


def completion_body(completion: Completion) -> dict[str, Any]:
    message = {"role": "assistant", "content": " ".join(completion.words), "tool_calls": None}
    choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason}
    return {
        "id": completion.id,
        "object": "chat.completion",
        "model": completion.model,
        "created": completion.created,
        "choices": [choice],
        "usage": completion.usage,
    }


def chunk_body(
    completion: Completion,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    body = {
        "id": completion.id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": completion.model,
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def model_card(spec: ModelSpec, created: int) -> dict[str, Any]:
    capabilities = {
        "completion_chat": True,
        "completion_fim": spec.completion_fim,
        "function_calling": True,
        "fine_tuning": False,
        "vision": spec.vision,
        "reasoning": spec.reasoning,
        "classification": False,
    }
    return {
        "id": spec.id,
        "object": "model",
        "created": created,
        "owned_by": "mistralai",
        "capabilities": capabilities,
        "name": spec.alias,
        "description": f"Simulated {spec.id}",
        "max_context_length": spec.max_context_length,
        "aliases": [spec.alias],
        "deprecation": None,
        "default_model_temperature": 0.3,
        "type": "base",
    }


# --- ASGI plumbing --------------------------------------------------------------------


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


async def send_json(send: Send, status: int, body: Any) -> None:
    payload = _dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def send_event(send: Send, data: bytes) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True}
    )


async def read_request(scope: Scope, receive: Receive) -> Request:
    chunks = []
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            break
        chunks.append(event.get("body", b""))
        if not event.get("more_body", False):
            break
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    return Request(scope["method"], scope["path"], headers, b"".join(chunks), asyncio.Event())


async def watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


async def serve_lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class MistralSimulator:
    """The ASGI application. Options are defaults; X-Sim-* headers override them per request."""

    def __init__(
        self,
        *,
        latency_ms: int = 0,
        token_latency_ms: int = 0,
        fail_rate: float = 0.0,
        fail_status: int = 500,
        fail_models: Mapping[str, int] | None = None,
        known_models_only: bool = False,
        seed: int = 0,
        record_limit: int = 100,
        cut_after: int | None = None,
        no_usage: bool = False,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        self.latency_ms = latency_ms
        self.token_latency_ms = token_latency_ms
        self.fail_rate = fail_rate
        self.fail_status = fail_status
        self.fail_models = dict(fail_models or {})
        self.known_models_only = known_models_only
        # Defaults for every stream (the X-Sim-* headers still override them per request).
        self.cut_after = cut_after
        self.no_usage = no_usage
        self._rng = random.Random(seed)
        self._records: deque[dict[str, Any]] = deque(maxlen=record_limit)
        # Tests read the record from another thread than the server's event loop.
        self._records_lock = threading.Lock()

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._records_lock:
            return list(self._records)

    def reset(self) -> None:
        with self._records_lock:
            self._records.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        watcher = asyncio.create_task(watch_disconnect(receive, request.disconnected))
        try:
            await self.dispatch(request, send)
        except ErrorResponse as exc:
            await send_json(send, exc.status, exc.body)
        finally:
            watcher.cancel()

    async def dispatch(self, request: Request, send: Send) -> None:
        routes: dict[tuple[str, str], Callable[[Request, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/v1/models"): self.list_models,
            ("GET", "/_sim/requests"): self.show_requests,
            ("POST", "/_sim/reset"): self.reset_requests,
        }
        handler = routes.get((request.method, request.path))
        if handler is None:
            known_path = any(path == request.path for _, path in routes)
            status = 405 if known_path else 404
            await send_json(send, status, {"detail": _reason(status)})
            return
        if request.path.startswith("/v1/"):
            self.record(request)
        await handler(request, send)

    def record(self, request: Request) -> None:
        try:
            body: Any = json.loads(request.raw_body) if request.raw_body else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = request.raw_body.decode("utf-8", errors="replace")
        headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        entry = {"method": request.method, "path": request.path, "headers": headers, "body": body}
        with self._records_lock:
            self._records.append(entry)

    async def admit(self, request: Request) -> Controls | None:
        """Checks shared by /v1 endpoints; None means the client went away while we waited."""
        controls = parse_controls(
            request.headers, self.latency_ms, self.token_latency_ms, self.cut_after, self.no_usage
        )
        if not await request.pause(controls.latency_ms):
            return None
        if not is_authorized(request.headers):
            raise ErrorResponse(401, error_body(401))
        if controls.status is not None:
            raise ErrorResponse(controls.status, error_body(controls.status))
        return controls

    def injected_failure(self, model: str) -> ErrorResponse | None:
        if model in self.fail_models:
            status = self.fail_models[model]
            return ErrorResponse(status, error_body(status))
        if self.known_models_only and model not in KNOWN_MODEL_NAMES:
            return ErrorResponse(400, error_body(400, f"Invalid model: {model}"))
        if self.fail_rate and self._rng.random() < self.fail_rate:
            return ErrorResponse(self.fail_status, error_body(self.fail_status))
        return None

    async def chat_completions(self, request: Request, send: Send) -> None:
        controls = await self.admit(request)
        if controls is None:
            return
        body = parse_chat_request(request.raw_body)
        failure = self.injected_failure(body["model"])
        if failure is not None:
            raise failure
        completion = build_completion(body, controls.completion_tokens)
        if body.get("stream"):
            await self.stream(request, send, completion, controls)
        else:
            await send_json(send, 200, completion_body(completion))

    async def stream(
        self, request: Request, send: Send, completion: Completion, controls: Controls
    ) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        pieces = stream_pieces(completion.words)
        for index, piece in enumerate(pieces):
            if controls.cut_after is not None and index >= controls.cut_after:
                raise StreamCut
            if index and not await request.pause(controls.token_latency_ms):
                return
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            await send_event(send, _dumps(chunk_body(completion, delta)))
        if controls.cut_after is not None:
            raise StreamCut
        if pieces and not await request.pause(controls.token_latency_ms):
            return
        delta = {"content": ""} if pieces else {"role": "assistant", "content": ""}
        usage = None if controls.no_usage else completion.usage
        last = chunk_body(completion, delta, completion.finish_reason, usage)
        await send_event(send, _dumps(last))
        await send_event(send, b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def list_models(self, request: Request, send: Send) -> None:
        if await self.admit(request) is None:
            return
        created = int(time.time())
        cards = [model_card(spec, created) for spec in MODELS]
        await send_json(send, 200, {"object": "list", "data": cards})

    async def show_requests(self, request: Request, send: Send) -> None:
        await send_json(send, 200, {"object": "list", "data": self.requests})

    async def reset_requests(self, request: Request, send: Send) -> None:
        self.reset()
        await send_json(send, 200, {"object": "list", "data": []})


# --- serving --------------------------------------------------------------------------


def run(
    host: str = "127.0.0.1", port: int = 8900, *, log_level: str = "info", **options: Any
) -> None:
    """Serve a simulator in the foreground until interrupted."""
    hide_stream_cut_tracebacks()
    uvicorn.run(
        MistralSimulator(**options),
        host=host,
        port=port,
        log_level=log_level,
        lifespan="off",
        backlog=4096,
        timeout_graceful_shutdown=5,
    )


@contextlib.contextmanager
def running_simulator(app: MistralSimulator | None = None, **options: Any) -> Iterator[str]:
    """Serve `app` (or a new simulator built from options) on a free loopback port in a
    background thread; yields its base URL."""
    if app is not None and options:
        raise TypeError("pass either an app or simulator options, not both")
    hide_stream_cut_tracebacks()
    config = uvicorn.Config(
        app or MistralSimulator(**options),
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="off",
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="mistral-simulator", daemon=True
    )
    thread.start()
    try:
        _wait_until_started(server, thread)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait_until_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the Mistral simulator did not start")
        time.sleep(0.01)
