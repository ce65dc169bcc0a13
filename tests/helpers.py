"""Small helpers shared by the test packages."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

import aiomqtt
import pytest

from server.db import Database
from server.mqtt_url import parse as parse_broker


def unique_id(prefix: str) -> str:
    """An id no other test (or concurrent test session on a shared broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def drop_rollouts(db: Database) -> None:
    """Delete every tenant's rollouts. Rollout engines work for every
    tenant, and a rollout keeps its engines busy after it ends while its
    written devices wait for an outcome: a test that starts engines drops
    what earlier tests left."""
    async with db.admin() as con:
        await con.execute("DELETE FROM rollouts")


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109
    what: str = "the condition",
) -> None:
    """Poll `check` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)


async def clear_retained(mqtt_url: str, prefix: str) -> None:
    """Delete the retained messages under `prefix`/# (an empty retained
    message removes one), so a shared broker does not collect them."""
    found: set[str] = set()
    async with aiomqtt.Client(
        **parse_broker(mqtt_url).client_options(), identifier=unique_id("test-clear")
    ) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                async for message in client.messages:
                    if message.retain and message.payload:
                        found.add(message.topic.value)
        for topic in found:
            await client.publish(topic, b"", qos=1, retain=True)
