"""The HTTP transport under the Mistral SDK: aiohttp, behind httpx2's transport API.

The SDK speaks httpx2, whose default transport (httpcore2 over h11) parses HTTP in
pure Python: about a millisecond of the gateway's CPU per call, more than the SDK
itself (bench/RESULTS.md). aiohttp parses in C (llhttp) and keeps its own pool of
keep-alive connections. The SDK and httpx2's client are unchanged above this: they
build the request, read the body, decode gzip and raise the SDK's errors; this
transport only moves bytes and turns aiohttp's failures into httpx2's, so the gateway
tells a timeout or a refused connection (fall back to the next model) from an answer.

What it keeps from httpx2's transport: TLS verified against the same certificates
(`httpx2.create_ssl_context`: certifi, or SSL_CERT_FILE), proxies from HTTP(S)_PROXY,
ALL_PROXY and NO_PROXY (read when the client is made), the SDK's per-request timeouts
(connect, pool and read), no redirects followed, bodies passed through undecoded.
What it does not do: HTTP/2 (the SDK's client does not ask for it either) and write
timeouts (request bodies are small and the gateway refuses large ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx2

# Set by aiohttp itself from the URL and body, or meaningless per hop.
_NOT_FORWARDED = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@contextlib.contextmanager
def _as_httpx_errors(request: httpx2.Request) -> Iterator[None]:
    """aiohttp's failures as the httpx2 errors the SDK and the gateway expect."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx2.ConnectTimeout(str(exc) or "connecting timed out", request=request) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise httpx2.ReadTimeout(str(exc) or "reading timed out", request=request) from exc
    except aiohttp.ClientProxyConnectionError as exc:
        raise httpx2.ProxyError(str(exc), request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx2.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        message = str(exc) or "the server closed the connection"
        raise httpx2.RemoteProtocolError(message, request=request) from exc
    except aiohttp.ClientResponseError as exc:  # a response aiohttp could not parse
        raise httpx2.RemoteProtocolError(str(exc), request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx2.UnsupportedProtocol(str(exc), request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise httpx2.ReadError(str(exc) or type(exc).__name__, request=request) from exc


class _ResponseStream(httpx2.AsyncByteStream):
    """The body as it arrives; closing it early closes the connection (a stream the
    gateway stops reading must stop upstream too)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response, self._request = response, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection is reused
        else:
            self._response.close()


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport over an aiohttp session. A session belongs to the event loop
    it was made on: a process serves from one loop, and a call from another loop (a test
    server started again) gets a new session."""

    def __init__(self, *, max_connections: int = 2000, keepalive_seconds: float = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._ssl = httpx2.create_ssl_context()
        self._proxies = urllib.request.getproxies_environment()
        self._proxy_for: dict[tuple[str, str], str | None] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            self.forget()
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_seconds,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,  # httpx2 decodes, as it does over its own transport
                trust_env=False,  # proxies are read once, in __init__ (per request: 0.4 ms)
                cookie_jar=aiohttp.DummyCookieJar(),
                # httpx2 already set what it wants of these; aiohttp adds nothing.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
            self._loop = loop
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._session_here()
        try:
            body = request.content
        except httpx2.RequestNotRead:
            body = await request.aread()
        headers = [
            (name, value)
            for name, value in request.headers.multi_items()
            if name.lower() not in _NOT_FORWARDED
        ]
        with _as_httpx_errors(request):
            response = await session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                proxy=self._proxy(request.url),
                allow_redirects=False,
                timeout=_timeout(request.extensions.get("timeout") or {}),
            )
        return httpx2.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_ResponseStream(response, request),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("ascii", "replace"),
            },
        )

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

    async def aclose(self) -> None:
        session, self._session, self._loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    def forget(self) -> None:
        """Let go of the session without awaiting: closed on its own loop if that loop
        still runs (in another thread), dropped with its loop otherwise."""
        session, loop = self._session, self._loop
        self._session = self._loop = None
        if session is None or session.closed or loop is None:
            return
        if loop.is_running() and not _is_current(loop):
            asyncio.run_coroutine_threadsafe(session.close(), loop)
        elif loop.is_running():
            loop.create_task(session.close())
        else:
            # Its loop is gone, and its sockets can no longer be closed through it.
            # aiohttp's own synchronous close marks the pool closed (no warning when
            # it is collected) and stops there when the loop is closed.
            connector = session.connector
            session.detach()
            if connector is not None:
                connector._close()


def _is_current(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _timeout(timeout: dict) -> aiohttp.ClientTimeout:
    """httpx2's per-request timeouts (connect, read, write, pool; None is no limit)."""
    connect, pool = timeout.get("connect"), timeout.get("pool")
    waiting = None if connect is None or pool is None else connect + pool
    return aiohttp.ClientTimeout(
        total=None, connect=waiting, sock_connect=connect, sock_read=timeout.get("read")
    )


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
