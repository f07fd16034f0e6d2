"""The HTTP/1.1 transport under the SDK: bytes in and out as httpx2's own transport moves
them, connections kept alive only while they can be, and every failure as the httpx2
error the gateway's fallback logic expects. Against real sockets on loopback: the
simulator, and small servers that misbehave."""

from __future__ import annotations

import asyncio
import gzip
import json
import warnings

import httpx2
import pytest

from routing.simulator import running_simulator
from routing.transport import PAUSE_BYTES, DirectAsyncClient, Http11Transport, last_response

CHAT = {"model": "ministral-3b-latest", "messages": [{"role": "user", "content": "hi"}]}
KEY = {"Authorization": "Bearer simulated"}


def run(coroutine):
    return asyncio.run(coroutine)


class RawServer:
    """A loopback TCP server whose connection handler the test writes; counts
    connections and remembers whether the client closed its side."""

    def __init__(self, handle):
        self._handle = handle
        self.connections = 0
        self.client_closed = asyncio.Event()

    async def __aenter__(self):
        async def serve(reader, writer):
            self.connections += 1
            try:
                await self._handle(reader, writer)
                if not writer.is_closing() and await reader.read() == b"":
                    self.client_closed.set()
            except (ConnectionError, asyncio.IncompleteReadError):
                self.client_closed.set()
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()


async def read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answering(seen: list, times: int = 1, body: bytes = b'{"ok": true}'):
    """A RawServer handler that records `times` requests on one connection and answers
    each with `body` as JSON."""

    async def handle(reader, writer):
        for _ in range(times):
            seen.append(await read_request(reader))
            writer.write(response(body, "content-type: application/json"))
            await writer.drain()

    return handle


async def request_from(handle, method="GET", **client_options) -> httpx2.Response:
    """One request to a RawServer running `handle`, through a new transport."""
    async with (
        RawServer(handle) as server,
        httpx2.AsyncClient(transport=Http11Transport(), **client_options) as client,
    ):
        return await client.request(method, server.url, content=b"{}")


def test_a_chat_call_through_the_transport_is_what_the_simulator_answered():
    async def main(url):
        transport = Http11Transport()
        async with httpx2.AsyncClient(transport=transport) as client:
            first = await client.post(f"{url}/v1/chat/completions", json=CHAT, headers=KEY)
            second = await client.post(f"{url}/v1/chat/completions", json=CHAT, headers=KEY)
        return first, second

    with running_simulator() as url:
        first, second = run(main(url))
    assert first.status_code == second.status_code == 200
    assert first.json()["usage"]["prompt_tokens"] > 0
    assert first.headers["content-type"].startswith("application/json")
    assert first.http_version == "HTTP/1.1"


def test_connections_are_kept_alive_and_headers_and_body_arrive_unchanged():
    seen = []

    async def main():
        async with (
            RawServer(answering(seen, times=2)) as server,
            httpx2.AsyncClient(transport=Http11Transport()) as client,
        ):
            for n in range(2):
                reply = await client.post(
                    f"{server.url}/v1/x?n={n}", content=b'{"a": 1}', headers={"X-Tag": "t"}
                )
                assert reply.json() == {"ok": True}
            return server.connections

    assert run(main()) == 1  # both requests on one connection
    head, _, body = seen[1].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/x?n=1 HTTP/1.1")
    assert b"x-tag: t" in head.lower()
    assert b"content-length: 8" in head.lower()
    assert body == b'{"a": 1}'


def test_a_gzipped_body_is_decoded_by_httpx_as_over_its_own_transport():
    payload = json.dumps({"choices": []}).encode()

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(response(gzip.compress(payload), "content-encoding: gzip"))
        await writer.drain()

    assert run(request_from(handle)).content == payload


def test_a_refused_connection_is_a_connect_error():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with httpx2.AsyncClient(transport=Http11Transport()) as client:
            await client.get(f"http://127.0.0.1:{port}/")

    with pytest.raises(httpx2.ConnectError):
        run(main())


def test_an_upstream_that_does_not_answer_is_a_read_timeout():
    async def handle(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    with pytest.raises(httpx2.ReadTimeout):
        run(request_from(handle, "POST", timeout=0.2))


def test_a_body_cut_short_is_a_protocol_error():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    with pytest.raises(httpx2.RemoteProtocolError):
        run(request_from(handle))


def test_a_garbled_response_is_a_protocol_error():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()

    with pytest.raises(httpx2.RemoteProtocolError):
        run(request_from(handle))


def test_a_stream_closed_early_closes_the_upstream_connection():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for n in range(100):
            writer.write(b"6\r\nchunk" + str(n % 10).encode() + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport()) as client,
        ):
            async with client.stream("GET", server.url) as reply:
                async for chunk in reply.aiter_bytes():
                    assert chunk.startswith(b"chunk")
                    break
            await asyncio.wait_for(server.client_closed.wait(), timeout=2)
            return True

    assert run(main())


def test_proxies_come_from_the_environment_once(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    transport = Http11Transport()
    monkeypatch.delenv("HTTPS_PROXY")
    assert transport._proxy(httpx2.URL("https://api.mistral.ai/v1")) == "http://proxy.internal:3128"
    assert transport._proxy(httpx2.URL("http://127.0.0.1:8900/v1")) is None
    assert transport._proxy(httpx2.URL("http://localhost:8900/v1")) is None


def test_a_transport_used_from_a_new_event_loop_starts_a_new_pool():
    """Tests (and a server started again) run calls on more than one loop."""
    transport = Http11Transport()

    client = httpx2.AsyncClient(transport=transport)  # never closed: its loop ends first

    async def call(url):
        return (await client.post(f"{url}/v1/chat/completions", json=CHAT, headers=KEY)).status_code

    with running_simulator() as url, warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert run(call(url)) == 200
        assert run(call(url)) == 200  # the first loop is closed by now
        run(transport.aclose())


def test_a_body_without_length_or_chunks_runs_until_the_upstream_closes():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()
        writer.close()

    reply = run(request_from(handle))
    assert reply.status_code == 200 and reply.content == b"part one, part two"


def test_the_status_line_headers_and_reason_arrive_as_sent():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(response(b'{"message": "no"}', "x-request-id: r1", "x-request-id: r2",
                              status="429 Too Many Requests"))  # fmt: skip
        await writer.drain()

    reply = run(request_from(handle, "POST"))
    assert reply.status_code == 429 and reply.reason_phrase == "Too Many Requests"
    assert reply.headers.get_list("x-request-id") == ["r1", "r2"]
    assert reply.json() == {"message": "no"}


def test_a_connection_the_upstream_closed_while_idle_is_not_used_again():
    seen = []

    async def handle(reader, writer):
        seen.append(await read_request(reader))
        writer.write(response(b"{}"))
        await writer.drain()
        writer.close()  # the upstream's keep-alive ran out

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport()) as client,
        ):
            first = await client.post(server.url, content=b"{}")
            await asyncio.sleep(0.05)
            second = await client.post(server.url, content=b"{}")
            return first.status_code, second.status_code, server.connections

    assert run(main()) == (200, 200, 2)


def test_connection_close_or_an_expired_keep_alive_opens_a_new_connection():
    async def close_after(reader, writer):
        while True:
            await read_request(reader)
            writer.write(response(b"{}", "connection: close"))
            await writer.drain()

    async def calls(handle, **options):
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport(**options)) as client,
        ):
            for _ in range(3):
                assert (await client.post(server.url, content=b"{}")).status_code == 200
            return server.connections

    assert run(calls(close_after)) == 3
    assert run(calls(answering([], times=3))) == 1
    assert run(calls(answering([], times=3), keepalive_seconds=0)) == 3


def test_a_pool_at_its_limit_makes_the_next_call_wait_then_time_out():
    async def slow(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await asyncio.sleep(5)

    async def main():
        transport = Http11Transport(max_connections=1)
        async with (
            RawServer(slow) as server,
            httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(5, pool=0.2)) as client,
        ):
            async with client.stream("GET", server.url):  # holds the only connection
                with pytest.raises(httpx2.PoolTimeout):
                    await client.get(server.url)
            return len(transport._pool_here().open)

    assert run(main()) == 0  # the stream left early: its connection was closed


def test_a_call_waiting_for_room_gets_the_connection_given_back():
    seen = []

    async def main():
        transport = Http11Transport(max_connections=1)
        async with (
            RawServer(answering(seen, times=5)) as server,
            httpx2.AsyncClient(transport=transport) as client,
        ):
            replies = await asyncio.gather(
                *(client.post(server.url, content=b"{}") for _ in range(5))
            )
            return [r.status_code for r in replies], server.connections

    assert run(main()) == ([200] * 5, 1)


def test_a_call_that_gives_up_waiting_for_room_leaves_the_turn_to_the_next():
    seen = []

    async def main():
        transport = Http11Transport(max_connections=1)
        async with (
            RawServer(answering(seen, times=2)) as server,
            httpx2.AsyncClient(transport=transport) as client,
        ):
            first = await client.send(client.build_request("POST", server.url), stream=True)
            given_up = asyncio.create_task(client.post(server.url, content=b"{}"))
            waiting = asyncio.create_task(client.post(server.url, content=b"{}"))
            await asyncio.sleep(0.05)
            given_up.cancel()
            await first.aread()  # the connection comes back to the pool
            await first.aclose()
            reply = await asyncio.wait_for(waiting, timeout=2)
            return given_up.cancelled(), reply.status_code, server.connections

    assert run(main()) == (True, 200, 1)


def test_a_large_streamed_body_arrives_whole_while_its_reader_lags():
    """Reading from the upstream pauses while more than PAUSE_BYTES wait to be read,
    and resumes as the caller catches up."""
    payload = bytes(range(256)) * (3 * PAUSE_BYTES // 256)

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(response(payload))
        await writer.drain()

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport()) as client,
        ):
            received = bytearray()
            async with client.stream("GET", server.url) as reply:
                async for chunk in reply.aiter_raw():
                    received += chunk
                    await asyncio.sleep(0.001)
            return bytes(received)

    assert run(main()) == payload


def test_an_interim_response_is_skipped_for_the_final_one():
    async def handle(reader, writer):
        await read_request(reader)
        interim = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
        writer.write(interim + response(b'{"ok": 1}', "x-final: yes"))
        await writer.drain()

    reply = run(request_from(handle))
    assert reply.status_code == 200 and reply.json() == {"ok": 1}
    assert "link" not in reply.headers and reply.headers["x-final"] == "yes"


# --- A connection is reused only when nothing could mix two answers (review of 0a915b3)


def test_bytes_the_upstream_sends_while_a_connection_is_idle_never_answer_the_next_call():
    answers = iter([1, 2])

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(response(b'{"answer": %d}' % next(answers)))
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(response(b'{"stale": true}', status="500 Internal Server Error"))
        await writer.drain()

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport()) as client,
        ):
            first = await client.post(server.url, content=b"{}")
            await asyncio.sleep(0.1)  # the stale answer arrives while idle
            second = await client.post(server.url, content=b"{}")
            return first.json(), second.status_code, second.json(), server.connections

    assert run(main()) == ({"answer": 1}, 200, {"answer": 2}, 2)


def test_a_second_response_in_the_same_packet_is_not_merged_into_the_first():
    async def handle(reader, writer):
        await read_request(reader)
        extra = response(b'{"error": "extra"}', "x-tag: second", status="503 Unavailable")
        writer.write(response(b'{"answer": 1}', "x-tag: first") + extra)
        await writer.drain()

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport()) as client,
        ):
            reply = await client.post(server.url, content=b"{}")
            return reply.status_code, reply.headers.get_list("x-tag"), reply.content

    assert run(main()) == (200, ["first"], b'{"answer": 1}')


def test_a_chunked_bodys_trailers_are_not_headers():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked"
            b"\r\ntrailer: x-cost\r\n\r\n4\r\n{}  \r\n0\r\nx-cost: 42\r\n"
            b"content-type: text/html\r\n\r\n"
        )
        await writer.drain()

    reply = run(request_from(handle))
    assert reply.headers["content-type"] == "application/json" and "x-cost" not in reply.headers


def test_a_body_closed_unread_past_the_pause_leaves_a_connection_that_reads_again():
    big = b"x" * (PAUSE_BYTES + 1)  # its last bytes arrive as reading pauses

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(response(big))
        await writer.drain()
        await read_request(reader)
        writer.write(response(b'{"ok": true}'))
        await writer.drain()

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport(), timeout=2) as client,
        ):
            async with client.stream("GET", server.url):
                await asyncio.sleep(0.3)  # all in, none read: the caller went away
            return (await client.post(server.url, content=b"{}")).json(), server.connections

    assert run(main()) == ({"ok": True}, 1)


def test_an_idle_connection_closed_before_the_loop_read_it_is_not_reused():
    """The upstream's keep-alive ran out while the loop was busy: its close is in the
    socket, not yet read, when the next call takes the connection."""
    import queue
    import threading
    import time

    urls = queue.Queue()

    async def handle(reader, writer):
        await read_request(reader)
        writer.write(response(b"{}"))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()  # its keep-alive ran out

    def upstream():
        async def main():
            async with RawServer(handle) as server:
                urls.put(server.url)
                await asyncio.sleep(5)

        asyncio.run(main())

    threading.Thread(target=upstream, daemon=True).start()
    url = urls.get(timeout=5)

    async def main():
        async with httpx2.AsyncClient(transport=Http11Transport()) as client:
            await client.post(url, content=b"{}")
            time.sleep(0.1)  # the loop is busy; the upstream closes meanwhile
            return (await client.post(url, content=b"{}", timeout=2)).status_code

    assert run(main()) == 200


def test_a_connection_reset_in_a_body_without_length_is_an_error_not_an_answer():
    async def handle(reader, writer):
        import socket
        import struct

        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b'{"choices": [{"message": "the ans')
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    with pytest.raises(httpx2.ReadError):
        run(request_from(handle))


def test_the_pool_timeout_counts_from_the_call_and_waiters_go_in_turn():
    """A caller that sends again right after its answer does not starve a waiter."""

    async def handle(reader, writer):
        while True:
            await read_request(reader)
            await asyncio.sleep(0.02)
            writer.write(response(b"{}"))
            await writer.drain()

    async def main():
        async with (
            RawServer(handle) as server,
            httpx2.AsyncClient(transport=Http11Transport(max_connections=1)) as client,
        ):
            stop, hog_calls = False, 0

            async def hog():
                nonlocal hog_calls
                while not stop:
                    await client.post(server.url, content=b"{}")
                    hog_calls += 1

            hogging = asyncio.create_task(hog())
            await asyncio.sleep(0.01)
            waiting = client.post(server.url, content=b"{}", timeout=httpx2.Timeout(5, pool=1))
            reply = await asyncio.wait_for(waiting, timeout=3)
            stop = True
            await hogging
            return reply.status_code, hog_calls

    status, hog_calls = run(main())
    assert status == 200 and hog_calls <= 2


def test_a_closed_pool_fails_its_waiters_and_new_calls():
    async def slow(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    async def main():
        transport = Http11Transport(max_connections=1)
        async with (
            RawServer(slow) as server,
            httpx2.AsyncClient(transport=transport, timeout=5) as client,
        ):
            busy = asyncio.create_task(client.post(server.url, content=b"{}"))
            waiting = asyncio.create_task(client.post(server.url, content=b"{}"))
            await asyncio.sleep(0.05)
            transport._pool.close()
            results = await asyncio.gather(busy, waiting, return_exceptions=True)
            return [type(r) for r in results]

    assert run(main()) == [httpx2.RemoteProtocolError, httpx2.ConnectError]


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET /admin HTTP/1.1\r\nX:", []),
        ("POST", [(b"x-a: b\tx-b", b"1")]),
        ("POST", [(b"transfer-encoding ", b"chunked")]),
        ("POST", [(b"x-a", b"a\x00b")]),
        ("POST", [(b"x-a", b"a\r\nx-evil: 1")]),
    ],
)
def test_a_request_that_cannot_go_on_the_wire_unchanged_is_refused(method, headers):
    seen = []

    async def main():
        async with RawServer(answering(seen)) as server:
            request = httpx2.Request(method, server.url, headers=headers, content=b"{}")
            await Http11Transport().handle_async_request(request)

    with pytest.raises(httpx2.LocalProtocolError):
        run(main())
    assert seen == []


def test_the_requests_own_host_header_is_sent():
    seen = []

    async def main():
        async with RawServer(answering(seen)) as server:
            request = httpx2.Request("POST", server.url, headers={"Host": "api.example"})
            await (await Http11Transport().handle_async_request(request)).aread()

    run(main())
    assert b"\r\nHost: api.example\r\n" in seen[0]


def test_a_url_behind_a_proxy_goes_through_the_proxy(monkeypatch):
    seen = []
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # replaced below
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def main():
        async with RawServer(answering(seen)) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            transport = Http11Transport()
            async with httpx2.AsyncClient(transport=transport) as client:
                reply = await client.post("http://api.mistral.invalid/v1/x", content=b"{}")
                return reply.json()

    assert run(main()) == {"ok": True}
    assert seen[0].startswith(b"POST http://api.mistral.invalid/v1/x HTTP/1.1")


def test_a_head_request_goes_through_httpx2s_own_transport():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")  # no body: HEAD
        await writer.drain()

    reply = run(request_from(handle, "HEAD"))
    assert reply.status_code == 200 and reply.content == b""


# --- The SDK's client ---------------------------------------------------------------


def test_the_direct_client_sends_what_httpx2s_client_would():
    """Same request line, headers (the client's defaults merged) and body; a timeout
    given per request reaches the transport."""
    seen = []

    async def main():
        async with RawServer(answering(seen, times=2)) as server:
            for client_class in (httpx2.AsyncClient, DirectAsyncClient):
                async with client_class(transport=Http11Transport(), timeout=None) as client:
                    request = client.build_request(
                        "POST", f"{server.url}/v1/x", content=b"{}", headers={"X-Tag": "t"},
                        params={}, timeout=7,
                    )  # fmt: skip
                    assert request.extensions["timeout"]["read"] == 7
                    reply = await client.send(request)
                    assert reply.json() == {"ok": True} and reply.request is request

    run(main())
    plain, direct = seen
    assert direct == plain
    assert b"accept-encoding: gzip" in direct.lower() and b"x-tag: t" in direct.lower()


def test_the_direct_client_leaves_everything_else_to_httpx2():
    seen = []

    async def main():
        async with (
            RawServer(answering(seen, body=b"{}")) as server,
            DirectAsyncClient(transport=Http11Transport()) as client,
        ):
            await client.post(f"{server.url}/v1/x", json={"a": 1}, params={"n": "2"})

    run(main())
    assert seen[0].startswith(b"POST /v1/x?n=2 HTTP/1.1")
    assert seen[0].endswith(b'{"a":1}')


def test_each_task_sees_the_response_it_was_sent():
    """The gateway replies with the upstream's own bytes: concurrent calls never mix."""

    async def handle(reader, writer):
        request = await read_request(reader)
        tag = request.split(b"\r\n")[0].split(b"/t/")[1].split(b" ")[0]
        await asyncio.sleep(0.05)
        writer.write(response(b'{"tag": "' + tag + b'"}', "content-type: application/json"))
        await writer.drain()

    async def main():
        async with (
            RawServer(handle) as server,
            DirectAsyncClient(transport=Http11Transport()) as client,
        ):

            async def call(tag):
                assert last_response.get() is None
                await client.send(client.build_request("GET", f"{server.url}/t/{tag}"))
                return last_response.get().json()["tag"]

            return await asyncio.gather(*(call(str(n)) for n in range(5)))

    assert run(main()) == ["0", "1", "2", "3", "4"]
