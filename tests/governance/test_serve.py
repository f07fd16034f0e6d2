"""`manage.py serve` (what `make run` runs): the service and, without a Mistral key, the
simulator; a SIGTERM stops both."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, seconds: float = 30) -> httpx2.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return httpx2.get(url, timeout=1)
        except httpx2.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_serve_runs_the_simulator_and_stops_everything_on_sigterm(tmp_path):
    port, sim_port = free_port(), free_port()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("MISTRAL_API_KEY", "MISTRAL_SERVER_URL")
        },
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        "SIMULATOR_PORT": str(sim_port),
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=120
    )
    serve = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[int] = []
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/admin/login/").status_code == 200
        assert wait_until_up(f"http://127.0.0.1:{sim_port}/_sim/requests").status_code == 200
        children = children_of(serve.pid)
        assert len(children) == 3  # simulator, celery worker with beat, uvicorn
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=30)
        assert "SIMULATOR" in output
        for child in children:
            assert (
                not Path(f"/proc/{child}").exists()
                or "zombie" in Path(f"/proc/{child}/status").read_text()
            )
    finally:
        for pid in [*children, serve.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def child_with_its_own(tmp_path, *, ignore_sigterm: bool):
    """A child (spawned as serve spawns) that starts a process of its own, as Celery's
    worker starts its pool; returns (child, its process's pid)."""
    from governance.management.commands.serve import spawn

    grandchild_pid = tmp_path / "grandchild.pid"
    code = (
        "import signal, subprocess, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "")
        + "pool = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(grandchild_pid)!r}, 'w').write(str(pool.pid))\n"
        "time.sleep(60)\n"
    )
    child = spawn([sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not grandchild_pid.exists() or not grandchild_pid.read_text():
        assert time.monotonic() < deadline, "the child never started its own"
        time.sleep(0.05)
    return child, int(grandchild_pid.read_text())


def assert_ended(pid: int) -> None:
    for _ in range(100):  # an orphan is reaped by init once killed
        if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text():
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the child's own process outlived it")


def test_a_child_that_ignores_sigterm_is_killed_with_what_it_started(tmp_path):
    """As Celery's worker can: still in its warm shutdown at the deadline, with a pool
    process of its own. Killing only the worker used to orphan the pool process."""
    from governance.management.commands.serve import stop

    child, pool = child_with_its_own(tmp_path, ignore_sigterm=True)
    started = time.monotonic()
    stop([child], seconds=0.5)
    assert time.monotonic() - started < 5
    assert child.returncode == -signal.SIGKILL
    assert_ended(pool)


def test_what_a_child_left_behind_when_it_ended_is_ended_too(tmp_path):
    """A child that stops on SIGTERM but leaves a process of its own running (a Celery
    pool process whose worker died under it) would hold serve's output open."""
    from governance.management.commands.serve import stop

    child, pool = child_with_its_own(tmp_path, ignore_sigterm=False)
    stop([child], seconds=5)
    assert child.returncode == -signal.SIGTERM  # it ended on its own, in time
    assert_ended(pool)
