"""The HTTP transport under the Mistral SDK: a lean HTTP/1.1 client behind httpx2's
transport API.

The SDK speaks httpx2, whose default transport (httpcore2 over h11) parses HTTP in pure
Python: about a millisecond of the gateway's CPU per call. The gateway sends one kind of
request: a small JSON POST to one origin, over keep-alive connections, answered by a
JSON body or a stream of server-sent events. This client does only what such a call
needs: it writes the request in one piece, parses the response with httptools (llhttp,
as uvicorn does), and hands the body over as it arrives. aiohttp, which did this before,
cost ~0.45 ms more of the event loop per call (its request and response objects,
tracing signals, timers, URL and multidict work: bench/RESULTS.md). The SDK and httpx2's
client are unchanged above it: they build the request, read the body, decode gzip and
raise the SDK's errors; this transport moves bytes and turns failures into httpx2's, so
the gateway tells a timeout or a refused connection (fall back to the next model) from
an answer.

What it keeps from httpx2's own transport: TLS verified against the same certificates
(`httpx2.create_ssl_context`: certifi, or SSL_CERT_FILE), the SDK's per-request timeouts
(connect, read and pool), no redirects followed, bodies passed through undecoded. A URL
that a proxy from HTTP(S)_PROXY, ALL_PROXY and NO_PROXY (read when the transport is
made) applies to, and a HEAD request, go through httpx2's own transport. What it does
not do: HTTP/2 (the SDK does not ask for it either) and write timeouts (request bodies
are small and the gateway refuses large ones).

A connection answers one request at a time and is reused only when its response was
whole and nothing else came: a byte the upstream sends unasked, a second response in
the same packet, or a close the loop has not yet read (checked before each reuse)
closes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import re
import select
import time
import urllib.request
from collections.abc import AsyncIterator

import httptools
import httpx2

# Written here from the URL and body, or meaningless per hop.
_NOT_FORWARDED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
# RFC 9110: a method and a field name are tokens; a field value has no control
# characters but tab.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A streamed body the caller has not read yet: reading from the upstream stops past this
# many bytes, and starts again below half of it.
PAUSE_BYTES = 1 << 20


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one origin: one request at a time, its response
    parsed as the bytes arrive."""

    def __init__(self, pool: _Pool, origin: tuple[str, str, int]) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._start()

    def _start(self) -> None:
        """Ready for the next response."""
        self.status = 0
        self.reason = b""
        self.http_version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self._asked = False  # a request was sent: bytes may come
        self._begun = False  # a (final) response began
        self._head_done = False
        self._keep_alive = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: httpx2.TransportError | None = None
        self._waiter: asyncio.Future | None = None

    # asyncio's side

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._asked or self.complete or self._error is not None:
            self._fail(httpx2.RemoteProtocolError("the upstream sent bytes nobody asked for"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx2.RemoteProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"the upstream sent malformed HTTP: {exc}"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    # httptools' side (llhttp goes on parsing past a message's end, so a second
    # message in the same packet would land in the first: it is refused)

    def on_message_begin(self) -> None:
        if self._begun:
            raise httptools.HttpParserError("a second response to one request")

    def on_status(self, reason: bytes) -> None:
        self._begun = True
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # after the head: a chunked body's trailers, dropped
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): the final one follows
            self.reason, self.headers = b"", []
            return
        self.status = status
        self.http_version = b"HTTP/" + self._parser.get_http_version().encode("ascii")
        self._keep_alive = self._parser.should_keep_alive()
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_BYTES and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:  # the end of an interim response
            self._begun = False
            return
        self.complete = True
        self._wake()

    # the transport's side

    async def send(self, wire: bytes, request: httpx2.Request, timeout: float | None) -> None:
        """Write the request; return once the response's status and headers are in."""
        self._asked = True
        self.transport.write(wire)
        while not self._head_done:
            if self._error is not None:
                raise _about(self._error, request)
            await self._wait(request, timeout)

    async def body(self, request: httpx2.Request, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= PAUSE_BYTES // 2 and not self.closed:
                    self._paused = False
                    self.transport.resume_reading()
                yield chunk
            elif self.complete:
                return
            elif self._error is not None:
                raise _about(self._error, request)
            else:
                await self._wait(request, timeout)

    def release(self) -> None:
        """The caller is done with the response: the connection goes back to the pool
        if the response was read to its end and the upstream keeps it open."""
        if self.complete and self._keep_alive and not self.closed:
            if self._paused:  # read whole, but not by the caller
                self.transport.resume_reading()
            self._start()
            self.pool.put_back(self)
        else:
            self.close()

    def looks_closed(self) -> bool:
        """Whether the upstream closed this idle connection, or sent on it unasked, in
        a way the loop has not read yet: then its socket is readable."""
        if self.closed:
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        return bool(poll.poll(0))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.discard(self)
            if self.transport is not None:
                self.transport.close()

    async def _wait(self, request: httpx2.Request, timeout: float | None) -> None:
        loop = self.pool.loop
        self._waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            self.close()
            message = f"the upstream sent nothing for {timeout} s"
            raise httpx2.ReadTimeout(message, request=request) from None
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: httpx2.TransportError) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _ended(self, exc: Exception | None) -> None:
        """The connection closed: the end of a body that runs until then, or an error
        if more of the response was to come."""
        self.closed = True
        self.pool.discard(self)
        if self.complete or self._error is not None:
            pass
        elif exc is None and self._head_done and self._to_close():
            self.complete = True  # the body ran until this clean close
        elif exc is not None:
            self._error = httpx2.ReadError(f"the connection to the upstream failed: {exc}")
        else:
            self._error = httpx2.RemoteProtocolError(
                "the upstream closed the connection before the whole response"
            )
        self._wake()

    def _to_close(self) -> bool:
        """Whether the body of this response runs until the connection closes (neither
        a length nor chunks)."""
        if self.status in (204, 304):
            return False
        framing = (b"content-length", b"transfer-encoding")
        return not any(name.lower() in framing for name, _ in self.headers)


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _about(error: httpx2.TransportError, request: httpx2.Request) -> httpx2.TransportError:
    """A connection's error, raised for the request that met it."""
    raised = type(error)(str(error), request=request)
    raised.__cause__ = error.__cause__
    return raised


class _Pool:
    """The connections of one event loop, idle ones by origin (the last used first),
    at most `limit` open at once. Callers that find no room wait in turn: a new caller
    queues behind the waiting ones, and a waiter woken keeps its place until it runs."""

    def __init__(self, loop, *, limit: int, keepalive_seconds: float, ssl) -> None:
        self.loop, self.limit, self.ssl = loop, limit, ssl
        self.keepalive_seconds = keepalive_seconds
        self.open: set[_Connection] = set()
        self.closed = False
        self._idle: dict[tuple, list[_Connection]] = {}
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    async def connection(self, origin: tuple, request, timeout: dict) -> _Connection:
        """An idle connection to `origin`, or a new one once there is room for it,
        within the pool timeout (counted once, from now)."""
        seconds = timeout.get("pool")
        deadline = None if seconds is None else self.loop.time() + seconds
        if self._waiting:  # others were first
            await self._room(request, deadline, seconds, first=False)
        while True:
            if self.closed:
                raise httpx2.ConnectError("the upstream client was closed", request=request)
            connection = self._idle_one(origin)
            if connection is not None:
                return connection
            if len(self.open) >= self.limit:
                self._close_an_idle_one()  # kept for another origin
            if len(self.open) < self.limit:
                break
            await self._room(request, deadline, seconds, first=True)
        connection = _Connection(self, origin)
        self.open.add(connection)
        try:
            await self._connect(connection, request, timeout.get("connect"))
        except BaseException:
            connection.close()
            raise
        return connection

    def _idle_one(self, origin: tuple) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            fresh = now - connection.idle_since < self.keepalive_seconds
            if fresh and not connection.looks_closed():
                return connection
            connection.close()
        return None

    async def _connect(self, connection: _Connection, request, seconds: float | None) -> None:
        scheme, host, port = connection.origin
        tls = scheme == "https"
        try:
            async with asyncio.timeout(seconds):
                await self.loop.create_connection(
                    lambda: connection,
                    host,
                    port,
                    ssl=self.ssl if tls else None,
                    server_hostname=host if tls else None,
                )
        except TimeoutError as exc:
            message = f"connecting to {host}:{port} took over {seconds} s"
            raise httpx2.ConnectTimeout(message, request=request) from exc
        except OSError as exc:  # refused, unreachable, unknown host, TLS failure
            message = f"connecting to {host}:{port} failed: {exc}"
            raise httpx2.ConnectError(message, request=request) from exc

    async def _room(self, request, deadline, seconds, *, first: bool) -> None:
        """Wait for a connection to come back or close (`first`: at the head of the
        queue, as a caller woken already)."""
        room = self.loop.create_future()
        if first:
            self._waiting.appendleft(room)
        else:
            self._waiting.append(room)
        woken = False
        try:
            async with asyncio.timeout_at(deadline):
                await room
            woken = True
        except TimeoutError as exc:
            message = f"all {self.limit} upstream connections stayed busy for {seconds} s"
            raise httpx2.PoolTimeout(message, request=request) from exc
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(room)
            if not woken and room.done() and not room.cancelled():
                self._make_room()  # woken as it gave up: the next one's turn

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._make_room()

    def discard(self, connection: _Connection) -> None:
        if connection in self.open:
            self.open.discard(connection)
            idle = self._idle.get(connection.origin)
            if idle and connection in idle:
                idle.remove(connection)
            self._make_room()

    def _make_room(self) -> None:
        """Wake the first caller still waiting: a connection came back, or closed."""
        for room in self._waiting:
            if not room.done():
                room.set_result(None)
                return

    def _close_an_idle_one(self) -> None:
        for idle in self._idle.values():
            if idle:
                idle[0].close()  # the longest idle
                return

    def close(self) -> None:
        self.closed = True
        for connection in list(self.open):
            connection.close()
        for room in self._waiting:  # they find the pool closed
            if not room.done():
                room.set_result(None)


class _ResponseStream(httpx2.AsyncByteStream):
    """The body as it arrives; closing it before its end closes the connection (a
    stream the gateway stops reading must stop upstream too)."""

    def __init__(self, connection: _Connection, request: httpx2.Request, timeout) -> None:
        self._connection, self._request, self._timeout = connection, request, timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._connection.body(self._request, self._timeout):
            yield chunk

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._connection.release()


class Http11Transport(httpx2.AsyncBaseTransport):
    """An httpx2 transport over keep-alive HTTP/1.1 connections of its own. Connections
    belong to the event loop they were opened on: a process serves from one loop, and a
    call from another loop (a test server started again) starts a new pool."""

    def __init__(self, *, max_connections: int = 2000, keepalive_seconds: float = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._ssl = httpx2.create_ssl_context()
        self._proxies = urllib.request.getproxies_environment()
        self._proxy_for: dict[tuple[str, str], str | None] = {}
        self._httpx: dict[str | None, httpx2.AsyncHTTPTransport] = {}
        self._pool: _Pool | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        proxy = self._proxy(url)
        if proxy is not None or request.method == "HEAD":
            return await self._httpx_transport(proxy).handle_async_request(request)
        if url.scheme not in ("http", "https"):
            message = f"the upstream URL must be http or https, not {url.scheme!r}"
            raise httpx2.UnsupportedProtocol(message, request=request)
        try:
            body = request.content
        except httpx2.RequestNotRead:
            body = await request.aread()
        host = url.raw_host.decode("ascii")  # an international name as IDNA encodes it
        origin = (url.scheme, host, url.port or (443 if url.scheme == "https" else 80))
        wire = _head(request, len(body)) + body
        timeout = request.extensions.get("timeout") or {}
        connection = await self._pool_here().connection(origin, request, timeout)
        try:
            await connection.send(wire, request, timeout.get("read"))
        except BaseException:
            connection.close()
            raise
        return httpx2.Response(
            status_code=connection.status,
            headers=connection.headers,
            stream=_ResponseStream(connection, request, timeout.get("read")),
            extensions={
                "http_version": connection.http_version,
                "reason_phrase": connection.reason,
            },
        )

    def _pool_here(self) -> _Pool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool.loop is not loop:
            self.forget()
            self._pool = _Pool(
                loop,
                limit=self._max_connections,
                keepalive_seconds=self._keepalive_seconds,
                ssl=self._ssl,
            )
        return self._pool

    def _proxy(self, url: httpx2.URL) -> str | None:
        """The proxy HTTP(S)_PROXY or ALL_PROXY name for this URL, unless NO_PROXY
        exempts its host (as httpx2 and urllib read them)."""
        key = (url.scheme, url.host)
        if key not in self._proxy_for:
            proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
            if proxy and urllib.request.proxy_bypass_environment(url.host, self._proxies):
                proxy = None
            self._proxy_for[key] = proxy
        return self._proxy_for[key]

    def _httpx_transport(self, proxy: str | None) -> httpx2.AsyncHTTPTransport:
        """httpx2's own transport, through `proxy` if one is named."""
        if proxy not in self._httpx:
            self._httpx[proxy] = httpx2.AsyncHTTPTransport(
                verify=self._ssl,
                proxy=proxy,
                limits=httpx2.Limits(max_connections=self._max_connections),
            )
        return self._httpx[proxy]

    async def aclose(self) -> None:
        others = list(self._httpx.values())
        self.forget()
        for transport in others:
            await transport.aclose()

    def forget(self) -> None:
        """Let go of the connections without awaiting: closed on their own loop if it
        still runs (in another thread, or this one), dropped with it otherwise."""
        pool, self._pool, self._httpx = self._pool, None, {}
        if pool is None or not pool.open or pool.loop.is_closed():
            return
        if pool.loop.is_running() and not _is_current(pool.loop):
            pool.loop.call_soon_threadsafe(pool.close)
        else:
            pool.close()


def _head(request: httpx2.Request, length: int) -> bytes:
    """The request line and headers, as they go on the wire; a method, header name or
    value that could not go there unchanged is refused (as h11 does)."""
    method, url = request.method.encode("ascii"), request.url
    if not _TOKEN.fullmatch(method):
        raise httpx2.LocalProtocolError(f"not a method: {method!r}", request=request)
    host = request.headers.get("host", "").encode("ascii") or url.netloc
    parts = [method, b" ", url.raw_path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            message = f"the header {name!r} cannot be sent as it is"
            raise httpx2.LocalProtocolError(message, request=request)
        if name.lower() not in _NOT_FORWARDED:
            parts += (name, b": ", value, b"\r\n")
    if _CONTROL.search(host) or b" " in url.raw_path:
        raise httpx2.LocalProtocolError("the URL cannot be sent as it is", request=request)
    if length or method in (b"POST", b"PUT", b"PATCH"):
        parts += (b"Content-Length: ", b"%d" % length, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _is_current(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class DirectAsyncClient(httpx2.AsyncClient):
    """httpx2's AsyncClient as the SDK uses it, doing per request only what those
    requests need. The SDK builds every request from a URL string, headers and bytes,
    and sends it without auth flows or redirects: this client parses each URL once,
    and sends straight through its transport (httpx2's send adds auth and redirect
    loops, event hooks, a cookie jar and a log line; about a fifth of the SDK's time
    per call). Anything else (data, files, json, cookies, params, auth, redirects)
    goes through httpx2's own code unchanged.

    The response of the last request sent in this context is kept (`last_response`),
    so a caller of the SDK can pass the upstream's bytes on as they came."""

    def __init__(self, *, transport: httpx2.AsyncBaseTransport, timeout=None) -> None:
        super().__init__(transport=transport, timeout=timeout)
        self._urls: dict[str, httpx2.URL] = {}

    def build_request(
        self,
        method,
        url,
        *,
        content=None,
        data=None,
        files=None,
        json=None,
        params=None,
        headers=None,
        cookies=None,
        timeout=httpx2.USE_CLIENT_DEFAULT,
        extensions=None,
    ) -> httpx2.Request:
        body_kinds = (data, files, json)
        if not isinstance(url, str) or body_kinds != (None, None, None) or params or cookies:
            return super().build_request(
                method, url, content=content, data=data, files=files, json=json,
                params=params, headers=headers, cookies=cookies, timeout=timeout,
                extensions=extensions,
            )  # fmt: skip
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 1000:  # the SDK's URLs are a handful; never grow unbounded
                self._urls.clear()
            parsed = self._urls[url] = self._merge_url(url)
        default = timeout is httpx2.USE_CLIENT_DEFAULT
        timeout = self.timeout if default else httpx2.Timeout(timeout)
        return httpx2.Request(
            method,
            parsed,
            content=content,
            headers=self._merge_headers(headers),
            extensions={"timeout": timeout.as_dict(), **(extensions or {})},
        )

    async def send(
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth=httpx2.USE_CLIENT_DEFAULT,
        follow_redirects=httpx2.USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        default = httpx2.USE_CLIENT_DEFAULT
        if auth is not default or follow_redirects is not default or self.follow_redirects:
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            if not stream:
                await response.aread()
        except BaseException:
            await response.aclose()
            raise
        last_response.set(response)
        return response


# The response DirectAsyncClient last sent in this context (task), for its caller.
last_response: contextvars.ContextVar[httpx2.Response | None] = contextvars.ContextVar(
    "last_response", default=None
)
