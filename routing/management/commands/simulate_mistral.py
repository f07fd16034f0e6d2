from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from routing.simulator import run


def model_status(value: str) -> tuple[str, int]:
    model, _, status = value.rpartition("=")
    if not model or not status.isdigit() or not 400 <= int(status) <= 599:
        raise argparse.ArgumentTypeError(f"expected MODEL=STATUS (400-599), got {value!r}")
    return model, int(status)


def fraction(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError("expected a number between 0 and 1")
    return rate


class Command(BaseCommand):
    help = (
        "Serve a Mistral-API-compatible simulator (chat completions, streaming, models) "
        "for demos, tests and benchmarks. X-Sim-* request headers override the options "
        "per request; see routing/simulator.py."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8900)
        parser.add_argument("--latency-ms", type=int, default=0, help="wait before first byte")
        parser.add_argument(
            "--token-latency-ms", type=int, default=0, help="wait between stream chunks"
        )
        parser.add_argument(
            "--fail-rate", type=fraction, default=0.0, help="share of chat requests that fail"
        )
        parser.add_argument(
            "--fail-status", type=int, default=500, help="status of --fail-rate failures"
        )
        parser.add_argument(
            "--fail-model",
            type=model_status,
            action="append",
            default=[],
            metavar="MODEL=STATUS",
            help="always fail this model with this status (repeatable)",
        )
        parser.add_argument(
            "--known-models-only",
            action="store_true",
            help="answer 400 invalid_model for models not in GET /v1/models",
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the --fail-rate RNG")
        parser.add_argument("--log-level", default="info")

    def handle(self, *args: Any, **options: Any) -> None:
        if not 400 <= options["fail_status"] <= 599:
            raise CommandError("--fail-status must be in 400-599")
        self.stdout.write(f"Mistral simulator on http://{options['host']}:{options['port']}")
        run(
            options["host"],
            options["port"],
            log_level=options["log_level"],
            latency_ms=options["latency_ms"],
            token_latency_ms=options["token_latency_ms"],
            fail_rate=options["fail_rate"],
            fail_status=options["fail_status"],
            fail_models=dict(options["fail_model"]),
            known_models_only=options["known_models_only"],
            seed=options["seed"],
        )
