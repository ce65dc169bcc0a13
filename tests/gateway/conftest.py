"""The gateway in front of the test server, and an HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from server.app import SERVICE_NAMES
from server.gateway.serve import running_gateway


@pytest.fixture(scope="session")
async def gateway_url(target: str) -> AsyncIterator[str]:
    async with running_gateway(
        target,
        SERVICE_NAMES,
        host="127.0.0.1",
        port=0,
        cors_origins=("http://console.example",),
        max_body_bytes=64 * 1024,
    ) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def http(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        yield client
