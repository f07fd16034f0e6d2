"""Serve the service: uvicorn (ASGI) and, without MISTRAL_API_KEY, the local Mistral
simulator as its upstream. Child processes (and theirs) are stopped when this command stops."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from urllib.error import URLError
from urllib.request import urlopen

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Serve the gateway, API and console (and the Mistral simulator when no key is set)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
        parser.add_argument(
            "--no-periodic",
            action="store_true",
            help="do not start the Celery worker and beat (run them yourself: make worker beat)",
        )

    def handle(self, *args, host, port, workers, no_periodic, **options):
        if not 0 < port < 65536:
            raise CommandError(f"--port {port}: use a port between 1 and 65535")
        children: list[subprocess.Popen] = []
        # A process manager stops us with SIGTERM: turn it into the same clean stop as ^C,
        # so the children are stopped too instead of being orphaned.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            if settings.UPSTREAM_SIMULATED:
                children.append(self._start_simulator())
            else:
                self.stdout.write(f"Upstream: Mistral at {settings.MISTRAL_SERVER_URL}")
            if not no_periodic:
                children.append(self._start_periodic_work())
            server = spawn(
                [
                    sys.executable, "-m", "uvicorn", "governance.asgi:application",
                    "--host", host, "--port", str(port), "--workers", str(workers),
                    "--no-server-header",
                    "--timeout-graceful-shutdown", str(settings.SERVER_GRACEFUL_SHUTDOWN_SECONDS),
                ]
            )  # fmt: skip
            children.append(server)
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            # Long enough for the web server's shutdown (its graceful wait, then the
            # charges still running: governance.asgi.lifespan), with a margin.
            stop(
                children,
                settings.SERVER_GRACEFUL_SHUTDOWN_SECONDS
                + settings.GATEWAY_SHUTDOWN_CHARGE_SECONDS
                + 5,
            )

    def _start_periodic_work(self) -> subprocess.Popen:
        broker = "Redis" if settings.REDIS_URL else "a file-system broker under var/"
        self.stdout.write(f"Periodic tasks: a Celery worker with beat, on {broker}.")
        return spawn(
            [
                sys.executable, "-m", "celery", "-A", "governance", "worker", "--beat",
                "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                "--concurrency", "1", "--loglevel", "warning",
            ]
        )  # fmt: skip

    def _start_simulator(self) -> subprocess.Popen:
        port = settings.SIMULATOR_PORT
        self.stdout.write(
            f"MISTRAL_API_KEY is not set: LLM calls go to the local Mistral SIMULATOR on "
            f"127.0.0.1:{port} (deterministic text, no real model)."
        )
        simulator = spawn(
            [
                sys.executable, "manage.py", "simulate_mistral", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning",
            ]
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if simulator.poll() is not None:
                raise CommandError(
                    f"the Mistral simulator did not start (port {port} taken? set SIMULATOR_PORT)"
                )
            try:
                urlopen(f"http://127.0.0.1:{port}/_sim/requests", timeout=1).close()
                return simulator
            except (URLError, OSError):
                time.sleep(0.2)
        simulator.terminate()
        raise CommandError("the Mistral simulator did not answer within 20 seconds")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def spawn(args: list[str]) -> subprocess.Popen:
    """A child process leading its own process group (stop() ends the whole group)."""
    return subprocess.Popen(args, process_group=0)  # noqa: S603 - our own arguments


def stop(children: list[subprocess.Popen], seconds: float) -> None:
    """SIGTERM to every child still running, then wait for them all, `seconds` in all
    (they stop side by side). A child still running then is killed with its process
    group: what it started too (Celery's pool), which killing the child alone left
    running, orphaned, holding this command's output open."""
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    for child in children:
        # A child that ended may leave what it started behind (a Celery pool process
        # whose parent died under it), orphaned in its group: ended with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
