"""Governance overhead and throughput of the gateway, measured with wrk.

    .venv/bin/python bench/gateway.py                        # SQLite (a fresh file)
    .venv/bin/python bench/gateway.py --database-url postgres://postgres@127.0.0.1:5432/sg_bench

Needs `wrk` (Debian: apt-get install wrk). Starts its own Mistral simulator(s) and
gateway on loopback, creates a tenant and key, then measures:

1. overhead at 1 client: the same request straight to the simulator and through the
   gateway, p50/p99 of each, overhead = gateway - direct;
2. governed calls per second at 50 concurrent clients;
3. 1,000 concurrent streaming calls held open against a slow upstream: errors must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SLICE_SECONDS = 2  # latency: direct and governed alternate in slices this long
BODY = {
    "model": "ministral-3b-latest",
    "messages": [{"role": "user", "content": "Classify this support ticket: my invoice is wrong."}],
    "max_tokens": 40,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status means it is up
                return
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


@contextmanager
def process(args: list[str], env: dict[str, str], ready_url: str):
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def simulator(env, port: int, *extra: str):
    args = [
        PYTHON,
        "manage.py",
        "simulate_mistral",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    return process(args, env, f"http://127.0.0.1:{port}/_sim/requests")


def gateway(env, port: int, workers: int):
    args = [
        PYTHON, "-m", "uvicorn", "governance.asgi:application", "--port", str(port),
        "--workers", str(workers), "--log-level", "warning", "--no-access-log", "--backlog", "4096",
    ]  # fmt: skip
    return process(args, env, f"http://127.0.0.1:{port}/v1/models")


def manage(env, *args: str) -> str:
    return subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout


def wrk(url: str, key: str, *, threads: int, connections: int, seconds: int, body=BODY) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        )
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "30s",
         "--latency", "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    os.unlink(script.name)
    return parse_wrk(out)


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(out: str) -> dict:
    result = {"raw": out}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _ms(match.group(1)) if match else None
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(map(int, errors.groups())) if errors else 0
    return result


def vacuum(database_url: str) -> None:
    """PostgreSQL: VACUUM ANALYZE before each round. Every call updates the same period
    row twice; where autovacuum is off (as on this machine's PostgreSQL) its dead
    versions would pile up across rounds and each round would measure the last one's
    garbage. Production runs autovacuum."""
    if database_url.startswith("postgres"):
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")


def cpu_speed_ms() -> float:
    """Milliseconds for a fixed pure-Python loop: this machine's speed varies by half
    from minute to minute, and rounds are only comparable alongside it."""
    started = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i
    return round((time.perf_counter() - started) * 1000, 1)


def _median(values):
    return round(statistics.median(values), 3)


def measure_latency(env, url, sim_port, gw_port, key, seconds, rounds) -> dict:
    """The same request straight to the simulator and through the gateway, 1 client,
    in `rounds` rounds; medians of the rounds. Within a round the two alternate in
    slices of SLICE_SECONDS (direct, governed, direct, ...): this machine's speed drifts
    from one second to the next, and a slice's overhead compares neighbours. A round's
    figures are the medians of its slices'."""
    direct_url = f"http://127.0.0.1:{sim_port}/v1/chat/completions"
    slices = max(1, round(seconds / SLICE_SECONDS))
    per_round = []
    with gateway(env, gw_port, workers=1):
        wrk(url, key, threads=1, connections=1, seconds=3)  # warm up
        for _ in range(rounds):
            vacuum(env["DATABASE_URL"])
            speed = cpu_speed_ms()
            pairs = []
            for _ in range(slices):
                direct = wrk(direct_url, key, threads=1, connections=1, seconds=SLICE_SECONDS)
                governed = wrk(url, key, threads=1, connections=1, seconds=SLICE_SECONDS)
                pairs.append((direct, governed))
            per_round.append(
                {
                    "cpu_speed_ms": speed,
                    "direct_p50_ms": _median([d["p50_ms"] for d, _ in pairs]),
                    "direct_p99_ms": _median([d["p99_ms"] for d, _ in pairs]),
                    "gateway_p50_ms": _median([g["p50_ms"] for _, g in pairs]),
                    "gateway_p99_ms": _median([g["p99_ms"] for _, g in pairs]),
                    "overhead_p50_ms": _median([g["p50_ms"] - d["p50_ms"] for d, g in pairs]),
                    "overhead_p99_ms": _median([g["p99_ms"] - d["p99_ms"] for d, g in pairs]),
                    "errors": sum(g["non_2xx"] + g["socket_errors"] for _, g in pairs),
                }
            )
    medians = {
        name: _median([r[name] for r in per_round]) for name in per_round[0] if name != "errors"
    }
    return {
        **medians,
        "one_client_errors": sum(r["errors"] for r in per_round),
        "latency_rounds": per_round,
    }


def measure_load(env, url, gw_port, key, seconds, workers, rounds) -> dict:
    """Governed calls per second with 50 concurrent clients, median of the rounds."""
    per_round = []
    with gateway(env, gw_port, workers=workers):
        wrk(url, key, threads=2, connections=50, seconds=3)  # warm up every worker
        for _ in range(rounds):
            vacuum(env["DATABASE_URL"])
            speed = cpu_speed_ms()
            load = wrk(url, key, threads=2, connections=50, seconds=seconds)
            per_round.append(
                {
                    "cpu_speed_ms": speed,
                    "calls_per_second": load["rps"],
                    "p50_ms": load["p50_ms"],
                    "errors": load["non_2xx"] + load["socket_errors"],
                }
            )
    return {
        "calls_per_second_50_clients": _median([r["calls_per_second"] for r in per_round]),
        "p50_ms_50_clients": _median([r["p50_ms"] for r in per_round]),
        "load_errors": sum(r["errors"] for r in per_round),
        "load_rounds": per_round,
    }


def measure_streams(env, url: str, gw_port: int, key: str, args) -> dict:
    """Streaming calls held open at once against an upstream that sends a token every
    100 ms (30 tokens: about 3 s a stream)."""
    with gateway(env, gw_port, workers=args.workers):
        streams = wrk(
            url,
            key,
            threads=2,
            connections=args.streams,
            seconds=args.seconds,
            body={**BODY, "stream": True, "max_tokens": 30},
        )
    return {
        "streams_open": args.streams,
        "stream_calls_completed": streams["requests"],
        "stream_p50_ms": streams["p50_ms"],
        "stream_errors": streams["non_2xx"] + streams["socket_errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--seconds", type=int, default=15, help="length of each wrk run")
    parser.add_argument(
        "--workers", type=int, default=2, help="uvicorn workers for the throughput run"
    )
    parser.add_argument("--streams", type=int, default=1000, help="0: skip the streaming run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="latency and throughput rounds (medians reported)"
    )
    parser.add_argument(
        "--only-streams", action="store_true", help="skip the latency and throughput runs"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    database_url = args.database_url or f"sqlite:///{workdir / 'bench.sqlite3'}"
    sim_port, slow_port, gw_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "MISTRAL_API_KEY": "bench",
        "MISTRAL_SERVER_URL": f"http://127.0.0.1:{sim_port}",
        "DEFAULT_DAILY_BUDGET": "1000000",
    }
    manage(env, "migrate", "-v0")
    customer = f"cus_bench{int(time.time())}"
    manage(env, "create_tenant", "--name", "Bench", "--stripe-customer", customer)
    key = (
        manage(env, "create_agent_key", "--tenant", customer, "--agent", "bench-bot")
        .strip()
        .splitlines()[-1]
    )
    engine = "PostgreSQL" if database_url.startswith("postgres") else "SQLite"
    results: dict[str, object] = {"database": engine, "cpus": os.cpu_count()}
    if engine == "PostgreSQL":
        with psycopg.connect(database_url) as conn:
            results["autovacuum"] = conn.execute("SHOW autovacuum").fetchone()[0]

    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    if not args.only_streams:
        with simulator(env, sim_port):
            results |= measure_latency(env, url, sim_port, gw_port, key, args.seconds, args.rounds)
            results |= measure_load(env, url, gw_port, key, args.seconds, args.workers, args.rounds)
    if args.streams:
        slow_env = {**env, "MISTRAL_SERVER_URL": f"http://127.0.0.1:{slow_port}"}
        with simulator(slow_env, slow_port, "--token-latency-ms", "100"):
            vacuum(database_url)
            results |= measure_streams(slow_env, url, gw_port, key, args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
