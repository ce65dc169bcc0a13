"""The LISTEN fan-out: delivery, bounded queues, and recovery from a dropped connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.listener import GAP, Listener


@pytest.fixture
async def listener(dsn: str) -> AsyncIterator[Listener]:
    lst = Listener(dsn)
    await lst.start()
    yield lst
    await lst.stop()


async def _notify(dsn: str, channel: str, *payloads: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        for p in payloads:
            await con.execute("SELECT pg_notify($1, $2)", channel, p)
    finally:
        await con.close()


async def test_every_subscriber_of_a_channel_gets_each_payload(
    listener: Listener, dsn: str
) -> None:
    a = await listener.subscribe("chan_a")
    b = await listener.subscribe("chan_a")
    other = await listener.subscribe("chan_b")
    await _notify(dsn, "chan_a", "1", "2")
    assert [await asyncio.wait_for(a.get(), 5) for _ in range(2)] == ["1", "2"]
    assert [await asyncio.wait_for(b.get(), 5) for _ in range(2)] == ["1", "2"]
    assert other.drain() == []


async def test_a_full_queue_turns_into_one_gap(listener: Listener, dsn: str) -> None:
    slow = await listener.subscribe("chan_slow", maxsize=3)
    await _notify(dsn, "chan_slow", *[str(n) for n in range(10)])
    await asyncio.sleep(0.3)
    items = slow.drain()
    assert GAP in items
    assert len(items) <= 3


async def test_a_dropped_connection_reconnects_and_signals_a_gap(
    listener: Listener, dsn: str
) -> None:
    sub = await listener.subscribe("chan_drop")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
        )
    finally:
        await admin.close()
    assert await asyncio.wait_for(sub.get(), 10) == GAP
    await asyncio.wait_for(listener.ready.wait(), 10)
    await _notify(dsn, "chan_drop", "after")
    assert await asyncio.wait_for(sub.get(), 5) == "after"
