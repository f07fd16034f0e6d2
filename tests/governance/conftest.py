from __future__ import annotations

from tests.routing.conftest import acme_key, gateway_url, simulator, spend  # noqa: F401
