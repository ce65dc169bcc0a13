"""Liveness with device sequence numbers, flood coalescing and the hold-down,
driven through Liveness.handle with DeviceMessages (no broker), against
PostgreSQL; and the settle contract: a message is settled once, after the
transaction that applied it committed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, cast

import pulse_client as pc
import pytest
from pulse.device.v1 import connectivity_pb2 as cp
from pulse.device.v1 import status_pb2 as st

from evaluator.liveness import Liveness, read
from evaluator.runtime import Publisher
from server import wire
from server.connectivity.model import Signal
from server.db import Connection, Database, create_pool
from tests.conftest import Tenant
from tests.helpers import eventually

from .conftest import create_devices


class Settles:
    """Settle hooks that count their calls, per message."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def hook(self) -> Callable[[], None]:
        index = len(self.calls)
        self.calls.append(0)

        def settle() -> None:
            self.calls[index] += 1

        return settle

    @property
    def settled(self) -> int:
        return sum(1 for n in self.calls if n)

    def exactly_once(self) -> bool:
        return all(n == 1 for n in self.calls)


class Device:
    """One device's messages, as the evaluator hands them to handlers."""

    def __init__(self, tenant_id: uuid.UUID, device_id: str, settles: Settles) -> None:
        self.tenant_id = tenant_id
        self.device_id = device_id
        self.settles = settles

    def message(self, kind: str, payload: bytes, *, retain: bool = False) -> wire.DeviceMessage:
        return wire.DeviceMessage(
            self.tenant_id,
            self.device_id,
            kind,
            payload,
            datetime.now(UTC),
            retain=retain,
            settle=self.settles.hook(),
        )

    def status(self, word: bytes, seq: int | None = None) -> wire.DeviceMessage:
        return self.message("status", wire.status_payload(word, seq=seq))

    def heartbeat(self, seq: int | None = None) -> wire.DeviceMessage:
        return self.message("heartbeat", wire.heartbeat(1.0, seq=seq))


async def _state(db: Database, tenant_id: uuid.UUID, device_id: str) -> dict[str, Any]:
    async with db.tenant(tenant_id) as con:
        row = await con.fetchrow(
            "SELECT status, last_seen_at, liveness_seq, session_seq FROM device_state"
            " WHERE device_id = $1",
            device_id,
        )
    assert row is not None
    return dict(row)


async def _events(client: pc.AsyncPulseClient, device_id: str) -> list[cp.ConnectionEvent]:
    return [e async for e in client.connectivity.list(device_id, page_size=1000)][::-1]


@pytest.fixture
async def device(client: pc.AsyncPulseClient, tenant: Tenant) -> Device:
    await create_devices(client, ["D"])
    return Device(tenant.tenant_id, "D", Settles())


@pytest.fixture
async def other_pool(dsn: str) -> AsyncIterator[Database]:
    """A second evaluator process's pool."""
    database = Database(await create_pool(dsn, size=2))
    yield database
    await database.close()


def test_status_and_heartbeats_carry_their_seq() -> None:
    d = Device(uuid.uuid4(), "D", Settles())
    assert read(d.status(wire.ONLINE, 7)) == (Signal.ONLINE, 7)
    assert read(d.status(wire.LOST, 7)) == (Signal.WILL, 7)
    assert read(d.message("status", b'{"status": " Offline ", "seq": 3}')) == (Signal.OFFLINE, 3)
    assert read(d.status(wire.OFFLINE)) == (Signal.OFFLINE, None)
    assert read(d.heartbeat(9)) == (Signal.ACTIVITY, 9)
    assert read(d.message("telemetry", b"\x00\x01binary")) == (Signal.ACTIVITY, None)
    assert read(d.message("twin/reported", wire.reported({}, 0, seq=4))) == (Signal.ACTIVITY, 4)
    # A bad seq is no seq: the message still says the device is there.
    for bad in (b'"7"', b"true", b"-1", b"9223372036854775808", b"1.5"):
        assert read(d.message("heartbeat", b'{"seq": ' + bad + b"}")) == (Signal.ACTIVITY, None)
        status = d.message("status", b'{"status": "online", "seq": ' + bad + b"}")
        assert read(status) == (Signal.ONLINE, None)
    assert read(d.message("status", b'{"status": 1, "seq": 2}')) == (Signal.WILL, 2)
    assert read(d.message("status", b"{not json")) == (Signal.WILL, None)


async def test_an_offline_processed_before_its_older_online_wins(
    client: pc.AsyncPulseClient, device: Device, fleet_db: Database, other_pool: Database
) -> None:
    """Two evaluators: one writes offline(2), then the other online(1)."""
    first = Liveness(fleet_db, flap_hold_s=0)
    second = Liveness(other_pool, flap_hold_s=0)
    await first.handle(device.status(wire.OFFLINE, 2))
    await first.flush()
    await second.handle(device.status(wire.ONLINE, 1))
    assert await second.flush() == []
    assert second.out_of_order == 1
    state = await _state(fleet_db, device.tenant_id, "D")
    assert (state["status"], state["liveness_seq"], state["session_seq"]) == ("OFFLINE", 2, None)
    assert [e.event_type for e in await _events(client, "D")] == [cp.DISCONNECTED]
    # In one batch the planner already knows.
    await first.handle(device.status(wire.ONLINE, 4))
    await first.handle(device.status(wire.OFFLINE, 3))
    await first.flush()
    assert first.out_of_order == 1
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "ONLINE"
    assert device.settles.exactly_once()


async def test_a_will_of_an_older_session_is_ignored(
    client: pc.AsyncPulseClient, device: Device, fleet_db: Database
) -> None:
    liveness = Liveness(fleet_db, flap_hold_s=0)
    await liveness.handle(device.status(wire.ONLINE, 5))
    await liveness.flush()
    # Session 3's will, published when it dropped, processed late.
    await liveness.handle(device.status(wire.LOST, 3))
    await liveness.flush()
    assert liveness.out_of_order == 1
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "ONLINE"
    # Session 5's own will is the current one.
    await liveness.handle(device.status(wire.LOST, 5))
    await liveness.flush()
    state = await _state(fleet_db, device.tenant_id, "D")
    assert (state["status"], state["liveness_seq"], state["session_seq"]) == ("OFFLINE", 5, 5)
    # ... and session 5's online, should it come late, cannot undo it.
    await liveness.handle(device.status(wire.ONLINE, 5))
    await liveness.flush()
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "OFFLINE"
    events = await _events(client, "D")
    assert [(e.event_type, e.trigger) for e in events] == [
        (cp.CONNECTED, cp.STATUS_ONLINE),
        (cp.CONNECTION_LOST, cp.LAST_WILL),
    ]


async def test_activity_with_seq_does_not_end_offline(
    client: pc.AsyncPulseClient, device: Device, fleet_db: Database
) -> None:
    liveness = Liveness(fleet_db, flap_hold_s=0)
    await liveness.handle(device.heartbeat(1))
    await liveness.flush()
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "ONLINE"
    await liveness.handle(device.status(wire.OFFLINE, 7))
    await liveness.flush()
    before = await _state(fleet_db, device.tenant_id, "D")
    # A heartbeat newer than the offline: still OFFLINE, but heard from.
    await liveness.handle(device.heartbeat(9))
    await liveness.flush()
    after = await _state(fleet_db, device.tenant_id, "D")
    assert after["status"] == "OFFLINE"
    assert after["last_seen_at"] > before["last_seen_at"]
    # The session's online, processed after that heartbeat, still ends
    # OFFLINE: activity does not move the order on.
    await liveness.handle(device.status(wire.ONLINE, 8))
    await liveness.flush()
    state = await _state(fleet_db, device.tenant_id, "D")
    assert (state["status"], state["liveness_seq"], state["session_seq"]) == ("ONLINE", 8, 8)
    events = await _events(client, "D")
    assert [e.trigger for e in events] == [cp.FIRST_SEEN, cp.STATUS_OFFLINE, cp.STATUS_ONLINE]
    assert liveness.out_of_order == 0


async def test_signals_without_seq_keep_arrival_order(device: Device, fleet_db: Database) -> None:
    liveness = Liveness(fleet_db, flap_hold_s=0)
    await liveness.handle(device.status(wire.ONLINE, 10))
    await liveness.flush()
    await liveness.handle(device.status(wire.OFFLINE))
    await liveness.flush()
    await liveness.handle(device.heartbeat())
    await liveness.flush()
    state = await _state(fleet_db, device.tenant_id, "D")
    assert (state["status"], state["liveness_seq"]) == ("ONLINE", 10)


async def test_a_flood_of_flaps_writes_a_handful_of_events_and_ends_right(
    client: pc.AsyncPulseClient, device: Device, fleet_db: Database
) -> None:
    """500 alternating online/offline in about 0.3 s, flushed as they come;
    then the hold-down passes and the last state is written."""
    liveness = Liveness(fleet_db, flap_hold_s=1.0)
    started = time.monotonic()
    for n in range(500):
        await liveness.handle(device.status(wire.ONLINE if n % 2 == 0 else wire.OFFLINE))
        if n % 37 == 36:
            await liveness.flush()
            await asyncio.sleep(0.02)
    await liveness.flush()  # the last word, offline, differs from the event: held
    if time.monotonic() - started < liveness.flap_hold_s:
        assert device.settles.settled < 500
        assert len(await _events(client, "D")) == 1
    await asyncio.sleep(liveness.flap_hold_s)
    await liveness.flush()
    events = await _events(client, "D")
    assert len(events) <= 3
    assert events[-1].status == st.OFFLINE
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "OFFLINE"
    # Changes between signals of one flush; those across two flushes are
    # not seen (one a flush at most).
    assert liveness.coalesced >= 499 - len(events) - 500 // 37 - 1
    assert len(device.settles.calls) == 500 and device.settles.exactly_once()


async def test_the_hold_down_releases_by_itself(
    client: pc.AsyncPulseClient, device: Device, fleet_db: Database
) -> None:
    liveness = Liveness(fleet_db, flap_hold_s=0.5, flush_s=0.02)
    runner = asyncio.create_task(liveness.run(cast(Publisher, object())))
    try:
        await liveness.handle(device.status(wire.ONLINE, 1))
        await eventually(lambda: device.settles.settled == 1, what="the online")
        await liveness.handle(device.status(wire.OFFLINE, 2))
        await liveness.handle(device.status(wire.ONLINE, 3))
        await liveness.handle(device.status(wire.OFFLINE, 4))
        await asyncio.sleep(0.2)
        # Held: the device got an event less than the hold-down ago.
        assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "ONLINE"
        assert device.settles.settled == 1
        await eventually(lambda: device.settles.settled == 4, timeout=5, what="the release")
        state = await _state(fleet_db, device.tenant_id, "D")
        assert (state["status"], state["liveness_seq"]) == ("OFFLINE", 4)
        assert len(await _events(client, "D")) == 2
        assert device.settles.exactly_once()
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_heartbeats_of_a_device_in_its_hold_down_are_not_held(
    device: Device, fleet_db: Database
) -> None:
    """Only signals that would change the status again wait: holding others
    would hold back the acknowledgement of every later message."""
    liveness = Liveness(fleet_db, flap_hold_s=5)
    await liveness.handle(device.status(wire.ONLINE))
    assert len(await liveness.flush()) == 1
    await liveness.handle(device.heartbeat())
    await liveness.handle(device.status(wire.ONLINE))
    await liveness.flush()
    assert device.settles.settled == 3
    await liveness.handle(device.status(wire.OFFLINE))
    assert await liveness.flush() == []
    assert device.settles.settled == 3
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "ONLINE"


async def test_settled_only_after_the_statement_committed(
    db: Database, device: Device, fleet_db: Database
) -> None:
    liveness = Liveness(fleet_db, flap_hold_s=0)
    await liveness.handle(device.status(wire.ONLINE, 1))
    await liveness.handle(device.heartbeat(2))
    async with db.tenant(device.tenant_id) as con:
        await con.execute("SELECT 1 FROM device_state WHERE device_id = 'D' FOR UPDATE")
        flush = asyncio.create_task(liveness.flush())
        await asyncio.sleep(0.3)
        assert not flush.done()  # waiting for the row lock
        assert device.settles.settled == 0
    await flush
    assert device.settles.calls == [1, 1]
    assert (await _state(fleet_db, device.tenant_id, "D"))["status"] == "ONLINE"


class _Flaky:
    """A Database whose next transactions fail as a lost connection would."""

    def __init__(self, real: Database, failures: int) -> None:
        self.real = real
        self.failures = failures

    def transaction(self, begin: str) -> AbstractAsyncContextManager[Connection]:
        if self.failures:
            self.failures -= 1
            return self._failing()
        return self.real.transaction(begin)

    @contextlib.asynccontextmanager
    async def _failing(self) -> AsyncIterator[Connection]:
        raise ConnectionResetError("connection lost")
        yield  # pragma: no cover


async def test_a_database_error_keeps_the_signals_and_their_settle_hooks(
    device: Device, fleet_db: Database
) -> None:
    flaky = _Flaky(fleet_db, failures=2)
    liveness = Liveness(cast(Database, flaky), flap_hold_s=0)
    await liveness.handle(device.status(wire.ONLINE, 1))
    with pytest.raises(ConnectionResetError):
        await liveness.flush()
    await liveness.handle(device.status(wire.OFFLINE, 3))
    await liveness.handle(device.status(wire.ONLINE, 2))  # older than the offline
    with pytest.raises(ConnectionResetError):
        await liveness.flush()
    assert device.settles.settled == 0
    await liveness.flush()
    assert device.settles.calls == [1, 1, 1]
    state = await _state(fleet_db, device.tenant_id, "D")
    assert (state["status"], state["liveness_seq"]) == ("OFFLINE", 3)


async def test_retained_messages_are_settled_at_once(device: Device, fleet_db: Database) -> None:
    liveness = Liveness(fleet_db)
    await liveness.handle(device.message("status", b"online", retain=True))
    assert device.settles.calls == [1]
    assert await liveness.flush() == []
    assert device.settles.calls == [1]
