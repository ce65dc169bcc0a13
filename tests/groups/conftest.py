"""The HTTP gateway in front of the test server, for the upstream routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from server.app import SERVICE_NAMES
from server.gateway.serve import running_gateway


@pytest.fixture(scope="session")
async def groups_gateway(target: str) -> AsyncIterator[str]:
    async with running_gateway(target, SERVICE_NAMES, host="127.0.0.1", port=0) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def http(groups_gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=groups_gateway, timeout=10) as client:
        yield client
