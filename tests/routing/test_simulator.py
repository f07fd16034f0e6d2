"""The Mistral simulator, driven through the official SDK and raw HTTP. No database."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from django.core.management import call_command
from hypothesis import given
from hypothesis import strategies as st
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from routing.management.commands import simulate_mistral
from routing.simulator import MODELS, MistralSimulator, count_prompt_tokens, running_simulator

AUTH = {"Authorization": "Bearer sk-test"}
MESSAGES = [
    {"role": "system", "content": "You are a terse billing assistant."},
    {"role": "user", "content": "Summarise invoice 42 for the tenant."},
]


@pytest.fixture(scope="module")
def simulator() -> MistralSimulator:
    return MistralSimulator(fail_models={"mistral-large-latest": 503})


@pytest.fixture(scope="module")
def base_url(simulator: MistralSimulator) -> Iterator[str]:
    with running_simulator(simulator) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Mistral:
    return Mistral(api_key="sk-test", server_url=base_url)


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "mistral-small-latest", "messages": MESSAGES, **fields}


def read_stream(base_url: str, headers: dict[str, str], body: dict[str, Any]):
    """The data payloads of an SSE response, and the error that ended it, if any."""
    payloads: list[str] = []
    try:
        with httpx2.stream(
            "POST", f"{base_url}/v1/chat/completions", headers=headers, json=body
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    payloads.append(line.removeprefix("data: "))
    except httpx2.TransportError as exc:
        return payloads, exc
    return payloads, None


def test_it_answers_in_mistrals_completion_shape(client: Mistral, base_url: str):
    response = client.chat.complete(model="mistral-small-latest", messages=MESSAGES)

    assert response.id.startswith("cmpl-")
    assert response.object == "chat.completion"
    assert response.model == "mistral-small-latest"
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    usage = response.usage
    assert usage.prompt_tokens == count_prompt_tokens(MESSAGES)
    assert usage.completion_tokens == len(choice.message.content.split())
    assert 20 <= usage.completion_tokens <= 200
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    raw = httpx2.post(f"{base_url}/v1/chat/completions", headers=AUTH, json=chat_body()).json()
    assert set(raw) == {"id", "object", "model", "created", "choices", "usage"}
    assert raw["choices"][0]["message"]["tool_calls"] is None


def test_it_answers_the_same_request_with_the_same_text(client: Mistral):
    def answer(messages: list[dict[str, Any]]) -> str:
        response = client.chat.complete(model="mistral-small-latest", messages=messages)
        return response.choices[0].message.content

    assert answer(MESSAGES) == answer(MESSAGES)
    assert answer(MESSAGES) != answer([{"role": "user", "content": "Something else"}])


def test_it_counts_text_chunks_like_string_content(client: Mistral):
    chunked = [{"role": "user", "content": [{"type": "text", "text": "Summarise invoice 42"}]}]

    response = client.chat.complete(model="ministral-8b-latest", messages=chunked)

    assert response.usage.prompt_tokens == count_prompt_tokens(
        [{"role": "user", "content": "Summarise invoice 42"}]
    )


def test_it_stops_at_max_tokens_with_finish_reason_length(client: Mistral):
    full = client.chat.complete(model="mistral-small-latest", messages=MESSAGES)
    cut = client.chat.complete(model="mistral-small-latest", messages=MESSAGES, max_tokens=5)

    assert cut.usage.completion_tokens == 5
    assert cut.choices[0].finish_reason == "length"
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)


def test_it_streams_one_chunk_per_completion_token(client: Mistral):
    full = client.chat.complete(model="mistral-small-latest", messages=MESSAGES)

    with client.chat.stream(model="mistral-small-latest", messages=MESSAGES) as stream:
        chunks = [event.data for event in stream]

    content_chunks = [c for c in chunks if c.choices[0].delta.content]
    last = chunks[-1]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage.completion_tokens == len(content_chunks)
    assert last.usage.prompt_tokens == count_prompt_tokens(MESSAGES)
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    assert text == full.choices[0].message.content


def test_a_stream_cut_by_max_tokens_finishes_with_length(base_url: str):
    payloads, error = read_stream(base_url, AUTH, chat_body(stream=True, max_tokens=3))

    assert error is None
    assert payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 3 == len(payloads) - 2


def test_an_injected_status_surfaces_as_an_sdk_error(client: Mistral):
    with pytest.raises(SDKError) as caught:
        client.chat.complete(
            model="mistral-small-latest", messages=MESSAGES, http_headers={"X-Sim-Status": "500"}
        )

    assert caught.value.status_code == 500
    assert json.loads(caught.value.body)["object"] == "error"


def test_it_fails_the_models_it_was_told_to_fail(client: Mistral):
    with pytest.raises(SDKError) as caught:
        client.chat.complete(model="mistral-large-latest", messages=MESSAGES)

    assert caught.value.status_code == 503
    assert client.chat.complete(model="mistral-medium-latest", messages=MESSAGES).choices


def test_a_slow_answer_times_the_client_out(base_url: str):
    impatient = Mistral(api_key="sk-test", server_url=base_url, timeout_ms=200)
    started = time.monotonic()

    with pytest.raises(httpx2.TimeoutException):
        impatient.chat.complete(
            model="mistral-small-latest",
            messages=MESSAGES,
            http_headers={"X-Sim-Latency-Ms": "3000"},
        )

    assert time.monotonic() - started < 2


def test_latency_option_delays_the_first_byte():
    with running_simulator(latency_ms=300) as url:
        started = time.monotonic()
        httpx2.post(f"{url}/v1/chat/completions", headers=AUTH, json=chat_body())
        assert time.monotonic() - started >= 0.3


def test_a_cut_stream_ends_without_usage_or_done(base_url: str):
    headers = {**AUTH, "X-Sim-Cut-After": "5"}

    payloads, error = read_stream(base_url, headers, chat_body(stream=True))

    assert isinstance(error, httpx2.RemoteProtocolError)
    assert len(payloads) == 5
    assert "[DONE]" not in payloads
    assert all("usage" not in json.loads(p) for p in payloads)


def test_a_stream_without_usage_still_ends_with_done(base_url: str):
    headers = {**AUTH, "X-Sim-No-Usage": "1"}

    payloads, error = read_stream(base_url, headers, chat_body(stream=True))

    assert error is None
    assert payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in json.loads(p) for p in payloads[:-1])


def test_completion_tokens_header_fixes_the_length(client: Mistral):
    response = client.chat.complete(
        model="mistral-small-latest",
        messages=MESSAGES,
        http_headers={"X-Sim-Completion-Tokens": "7"},
    )

    assert response.usage.completion_tokens == 7
    assert response.choices[0].finish_reason == "stop"


def test_it_refuses_a_request_without_a_bearer_key(base_url: str):
    response = httpx2.post(f"{base_url}/v1/chat/completions", json=chat_body())

    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized"}


def test_it_rejects_invalid_json_with_400(base_url: str):
    response = httpx2.post(
        f"{base_url}/v1/chat/completions",
        headers={**AUTH, "Content-Type": "application/json"},
        content=b"{not json",
    )

    assert response.status_code == 400
    assert response.json()["object"] == "error"


def test_it_rejects_a_request_without_messages_with_422(base_url: str):
    response = httpx2.post(
        f"{base_url}/v1/chat/completions", headers=AUTH, json={"model": "mistral-small-latest"}
    )

    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "invalid_request_error"
    assert body["message"]["detail"][0]["loc"] == ["body", "messages"]


def test_it_rejects_a_bad_control_header_with_400(base_url: str):
    headers = {**AUTH, "X-Sim-Latency-Ms": "soon"}

    response = httpx2.post(f"{base_url}/v1/chat/completions", headers=headers, json=chat_body())

    assert response.status_code == 400


def test_it_lists_model_cards(client: Mistral, base_url: str):
    listed = client.models.list()

    assert [card.id for card in listed.data] == [spec.id for spec in MODELS]
    raw = httpx2.get(f"{base_url}/v1/models", headers=AUTH).json()
    assert raw["object"] == "list"
    card = raw["data"][0]
    assert card["object"] == "model"
    assert card["owned_by"] == "mistralai"
    assert card["capabilities"]["completion_chat"] is True
    assert card["max_context_length"] > 0
    assert card["aliases"]


def test_known_models_only_refuses_other_models():
    with running_simulator(known_models_only=True) as url:
        client = Mistral(api_key="sk-test", server_url=url)
        with pytest.raises(SDKError) as caught:
            client.chat.complete(model="gpt-4o", messages=MESSAGES)
        assert caught.value.status_code == 400
        assert client.chat.complete(model="codestral-latest", messages=MESSAGES).choices


def test_fail_rate_is_repeatable_for_a_seed():
    def outcomes() -> list[int]:
        with (
            running_simulator(fail_rate=0.5, fail_status=503, seed=7) as url,
            httpx2.Client(base_url=url, headers=AUTH) as http,
        ):
            responses = [http.post("/v1/chat/completions", json=chat_body()) for _ in range(20)]
            return [r.status_code for r in responses]

    first = outcomes()
    assert first == outcomes()
    assert set(first) == {200, 503}


def test_it_records_requests_without_the_authorization_header():
    app = MistralSimulator()
    with running_simulator(app) as url:
        Mistral(api_key="sk-secret", server_url=url).chat.complete(
            model="mistral-small-latest", messages=MESSAGES, max_tokens=9
        )

        [recorded] = app.requests
        assert recorded["path"] == "/v1/chat/completions"
        assert recorded["body"]["max_tokens"] == 9
        assert "authorization" not in recorded["headers"]
        assert "sk-secret" not in json.dumps(recorded)
        listed = httpx2.get(f"{url}/_sim/requests").json()["data"]
        assert listed == app.requests
        httpx2.post(f"{url}/_sim/reset")
        assert app.requests == []


def test_it_serves_a_thousand_slow_streams_at_once():
    body = json.dumps(chat_body(stream=True)).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer x\r\n"
        "X-Sim-Token-Latency-Ms: 200\r\nX-Sim-Completion-Tokens: 3\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )

    async def one_stream(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + body)
        answer = await reader.read()
        writer.close()
        return answer

    async def all_streams(port: int) -> list[bytes]:
        return await asyncio.gather(*(one_stream(port) for _ in range(1000)))

    with running_simulator() as url:
        started = time.monotonic()
        answers = asyncio.run(all_streams(int(url.rsplit(":", 1)[1])))
        elapsed = time.monotonic() - started

    # Three 200 ms gaps per stream: served one by one this would take 600 s.
    assert elapsed < 8
    assert all(a.count(b"data: ") == 5 and b'"usage"' in a for a in answers)
    assert all(b"data: [DONE]" in a for a in answers)


@given(
    st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), st.text()),
        min_size=1,
    )
)
def test_prompt_tokens_never_exceed_utf8_bytes_plus_four_per_message(pairs):
    messages = [{"role": role, "content": text} for role, text in pairs]

    utf8_bytes = sum(len(text.encode()) for _, text in pairs)

    assert count_prompt_tokens(messages) <= utf8_bytes + 4 * len(messages)


@given(st.lists(st.text(), min_size=1))
def test_text_chunks_count_like_the_same_string(texts):
    chunks = [{"type": "text", "text": t} for t in texts]
    chunked = [{"role": "user", "content": [*chunks, {"type": "image_url", "image_url": "x"}]}]

    as_string = [{"role": "user", "content": "".join(texts)}]

    assert count_prompt_tokens(chunked) == count_prompt_tokens(as_string)


def test_the_command_passes_its_options_to_the_server(monkeypatch):
    served: dict[str, Any] = {}
    output = io.StringIO()
    monkeypatch.setattr(simulate_mistral, "run", lambda *args, **kw: served.update(kw, args=args))

    call_command(
        "simulate_mistral",
        "--port=8999",
        "--latency-ms=50",
        "--fail-rate=0.25",
        "--fail-model=mistral-large-latest=503",
        stdout=output,
    )

    assert "http://127.0.0.1:8999" in output.getvalue()

    assert served["args"] == ("127.0.0.1", 8999)
    assert served["latency_ms"] == 50
    assert served["fail_rate"] == 0.25
    assert served["fail_models"] == {"mistral-large-latest": 503}
