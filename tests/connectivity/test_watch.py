"""WatchConnectionEvents through the typed client: replay, live, resume, narrowing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pulse_client as pc
import pytest
from pulse.device.v1 import connectivity_pb2, status_pb2

from server import filters
from server.app import RunningServer
from server.connectivity.model import Signal
from server.connectivity.transitions import DeviceSignal, Transition, apply_signals, fleet
from server.db import Database
from server.groups import store as groups_store
from tests.conftest import ClientFactory, Tenant, TenantFactory

from .conftest import Collector, Message, create_devices, emit, flap


async def test_a_stream_starts_with_a_bookmark_then_delivers_each_event_once(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database
) -> None:
    devices = ["W-1", "W-2"]
    await create_devices(client, devices)
    watch = Collector.start(client.connectivity.watch())
    await watch.wait_ready()
    assert not watch.messages[0].HasField("event")
    assert watch.messages[0].cursor

    sent = await flap(fleet_db, tenant.tenant_id, devices, 3)
    await watch.wait_events(6)
    assert watch.ids == [t.event_id for t in sent]

    first = watch.events[0]
    assert first.tenant_id == str(tenant.tenant_id)
    assert first.device_id == "W-1"
    assert first.event_type == connectivity_pb2.CONNECTED
    assert first.previous_status == status_pb2.UNKNOWN
    assert first.status == status_pb2.ONLINE
    assert first.trigger == connectivity_pb2.STATUS_ONLINE
    assert first.timestamp.seconds > 0
    assert watch.events[2].event_type == connectivity_pb2.DISCONNECTED
    assert watch.events[2].trigger == connectivity_pb2.STATUS_OFFLINE
    await watch.stop()
    assert watch.error is None


async def test_resuming_from_a_cursor_misses_nothing_and_repeats_nothing(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database
) -> None:
    devices = ["R-1", "R-2"]
    await create_devices(client, devices)
    first = Collector.start(client.connectivity.watch())
    await first.wait_ready()
    before = await flap(fleet_db, tenant.tenant_id, devices, 2)
    await first.wait_events(4)
    middle = first.messages[2].cursor  # after the second event
    last = first.cursor
    await first.stop()

    # Committed while nobody watched.
    missed = await flap(fleet_db, tenant.tenant_id, devices, 2)

    resumed = Collector.start(client.connectivity.watch(resume_cursor=last))
    await resumed.wait_events(4)
    await resumed.wait_ready()
    after = await flap(fleet_db, tenant.tenant_id, devices, 1)
    await resumed.wait_events(6)
    assert resumed.ids == [t.event_id for t in missed + after]
    # The bookmark that ends the replay comes after the replayed events.
    assert [m.HasField("event") for m in resumed.messages[:5]] == [True] * 4 + [False]
    await resumed.stop()

    from_middle = Collector.start(client.connectivity.watch(resume_cursor=middle))
    await from_middle.wait_events(8)
    await from_middle.wait_ready()
    assert from_middle.ids == [t.event_id for t in before[2:] + missed + after]
    await from_middle.stop()


async def test_events_committed_out_of_id_order_are_all_delivered(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, db: Database
) -> None:
    await create_devices(client, ["SLOW-TX", "FAST-TX"])
    watch = Collector.start(client.connectivity.watch())
    await watch.wait_ready()
    start_cursor = watch.cursor

    # The first transaction takes the lower event id but commits last.
    async with fleet(fleet_db) as early:
        (low,) = await apply_signals(
            early, [DeviceSignal(tenant.tenant_id, "SLOW-TX", Signal.ONLINE, datetime.now(UTC))]
        )
        async with fleet(db) as late:
            (high,) = await apply_signals(
                late, [DeviceSignal(tenant.tenant_id, "FAST-TX", Signal.ONLINE, datetime.now(UTC))]
            )
        assert low.event_id < high.event_id
        # FAST-TX has committed. A reader that delivered it now and then
        # resumed after its id would never see SLOW-TX; this one waits.
        await asyncio.sleep(0.3)
        assert watch.ids == []

    await watch.wait_events(2)
    assert sorted(watch.ids) == [low.event_id, high.event_id]
    await watch.stop()

    # Replaying the same stretch gives the same events, once each.
    again = Collector.start(client.connectivity.watch(resume_cursor=start_cursor))
    await again.wait_events(2)
    await again.wait_ready()
    assert again.ids == watch.ids
    await again.stop()


async def test_streams_narrow_by_device_and_event_type_live_and_in_replay(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database
) -> None:
    devices = ["N-1", "N-2", "N-3"]
    await create_devices(client, devices)
    everything = Collector.start(client.connectivity.watch())
    by_device = Collector.start(client.connectivity.watch(device_ids=["N-1"]))
    by_type = Collector.start(
        client.connectivity.watch(event_types=[connectivity_pb2.DISCONNECTED])
    )
    both = Collector.start(
        client.connectivity.watch(device_ids=["N-2"], event_types=[connectivity_pb2.CONNECTED])
    )
    for watch in (everything, by_device, by_type, both):
        await watch.wait_ready()
    start_cursor = everything.cursor

    sent = await flap(fleet_db, tenant.tenant_id, devices, 2)
    await everything.wait_events(6)
    await by_device.wait_events(2)
    await by_type.wait_events(3)
    await both.wait_events(1)
    assert by_device.ids == [t.event_id for t in sent if t.device_id == "N-1"]
    assert by_type.ids == [t.event_id for t in sent if t.event_type == "DISCONNECTED"]
    assert both.ids == [
        t.event_id for t in sent if t.device_id == "N-2" and t.event_type == "CONNECTED"
    ]

    replay = Collector.start(
        client.connectivity.watch(resume_cursor=start_cursor, device_ids=["N-3"])
    )
    await replay.wait_ready()
    assert replay.ids == [t.event_id for t in sent if t.device_id == "N-3"]
    for watch in (everything, by_device, by_type, both, replay):
        await watch.stop()


async def test_a_stream_narrowed_by_a_group_follows_the_group_as_it_changes(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, db: Database
) -> None:
    await client.devices.create("G-LINE3", tags={"line": "3"})
    await client.devices.create("G-OTHER", tags={"line": "4"})
    await client.devices.create("G-MEMBER")
    line3 = filters.canonical_json(
        filters.parse_filter(
            {"tag_selectors": [{"key": "line", "operator": "EQUALS", "values": ["3"]}]}
        )
    )
    async with db.tenant(tenant.tenant_id) as con:
        await groups_store.create_group(
            con,
            tenant.tenant_id,
            group_id="line-3",
            name="Line 3",
            description="",
            group_type=groups_store.DYNAMIC,
            query_filter=line3,
        )
        await groups_store.create_group(
            con,
            tenant.tenant_id,
            group_id="picked",
            name="Picked",
            description="",
            group_type=groups_store.STATIC,
            query_filter=None,
        )
        await groups_store.add_members(con, tenant.tenant_id, "picked", ["G-MEMBER"])
    dynamic = Collector.start(client.connectivity.watch(group_id="line-3"))
    static = Collector.start(client.connectivity.watch(group_id="picked"))
    everything = Collector.start(client.connectivity.watch())
    for watch in (dynamic, static, everything):
        await watch.wait_ready()
    all_devices = ["G-LINE3", "G-OTHER", "G-MEMBER"]

    first = await emit(fleet_db, tenant.tenant_id, all_devices, Signal.ONLINE)
    await everything.wait_events(3)
    await dynamic.wait_events(1)
    await static.wait_events(1)

    # G-OTHER moves to line 3 and joins the static group: its next events count.
    await client.devices.update("G-OTHER", tags={"line": "3"})
    async with db.tenant(tenant.tenant_id) as con:
        await groups_store.add_members(con, tenant.tenant_id, "picked", ["G-OTHER"])
    second = await emit(fleet_db, tenant.tenant_id, all_devices, Signal.OFFLINE)
    await everything.wait_events(6)
    await dynamic.wait_events(3)
    await static.wait_events(3)

    def ids(transitions: list[Transition], wanted: set[str]) -> list[int]:
        return [t.event_id for t in transitions if t.device_id in wanted]

    assert dynamic.ids == ids(first, {"G-LINE3"}) + ids(second, {"G-LINE3", "G-OTHER"})
    assert static.ids == ids(first, {"G-MEMBER"}) + ids(second, {"G-MEMBER", "G-OTHER"})
    for watch in (dynamic, static, everything):
        await watch.stop()


async def test_a_stuck_watcher_costs_a_bounded_queue_and_catches_up_from_the_database(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    fleet_db: Database,
    running: RunningServer,
    target: str,
) -> None:
    devices = [f"S-{n:03d}" for n in range(100)]
    await create_devices(client, devices)
    # No window auto-tuning: the client's 64 KiB window fills quickly, and
    # from then on the server can only queue.
    slow_client = await pc.AsyncPulseClient.connect(
        target, token=tenant.token(), options=[("grpc.http2.bdp_probe", 0)]
    )
    try:
        slow = slow_client.connectivity.watch()
        bookmark = await slow.__anext__()
        assert not bookmark.HasField("event")
        fast = Collector.start(client.connectivity.watch())
        await fast.wait_ready()

        sent = await flap(fleet_db, tenant.tenant_id, devices, 30)
        await fast.wait_events(len(sent))  # the stuck watcher did not hold it back
        assert fast.ids == [t.event_id for t in sent]

        assert running.watches is not None
        states = running.watches.watcher_states()
        assert all(s.queued <= 256 for s in states)
        assert any(s.lags > 0 for s in states), "the stuck watcher never fell behind"

        received: list[int] = []
        async for message in slow:
            if message.HasField("event"):
                received.append(message.event.id)
            if len(received) == len(sent):
                break
        assert received == [t.event_id for t in sent]
        slow.cancel()
        await fast.stop()
    finally:
        await slow_client.close()


async def test_bad_requests_are_invalid_argument_and_unknown_groups_not_found(
    client: pc.AsyncPulseClient, make_tenant: TenantFactory, connect: ClientFactory
) -> None:
    async def first_error(stream: pc.AsyncStream[Message]) -> pc.PulseError:
        with pytest.raises(pc.PulseError) as info:
            async for _ in stream:
                pass
        return info.value

    error = await first_error(client.connectivity.watch(resume_cursor="not-a-cursor"))
    assert isinstance(error, pc.InvalidArgument)
    assert [v.field for v in error.field_violations] == ["resume_cursor"]

    error = await first_error(
        client.connectivity.watch(event_types=[connectivity_pb2.CONNECTION_EVENT_TYPE_UNSPECIFIED])
    )
    assert isinstance(error, pc.InvalidArgument)
    assert [v.field for v in error.field_violations] == ["event_types[0]"]

    error = await first_error(client.connectivity.watch(device_ids=["ok"] * 1001))
    assert isinstance(error, pc.InvalidArgument)

    error = await first_error(client.connectivity.watch(group_id="no-such-group"))
    assert isinstance(error, pc.NotFound)
    assert error.reason == "GROUP_NOT_FOUND"

    # A cursor is bound to its tenant.
    stream = client.connectivity.watch()
    cursor = (await stream.__anext__()).cursor
    stream.cancel()
    other = await make_tenant()
    other_client = await connect(other.token())
    error = await first_error(other_client.connectivity.watch(resume_cursor=cursor))
    assert isinstance(error, pc.InvalidArgument)


async def test_another_tenants_stream_sees_nothing(
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    make_tenant: TenantFactory,
    connect: ClientFactory,
    fleet_db: Database,
) -> None:
    other = await make_tenant()
    other_client = await connect(other.token())
    await create_devices(client, ["T-1"])
    await create_devices(other_client, ["T-1"])
    mine = Collector.start(client.connectivity.watch())
    theirs = Collector.start(other_client.connectivity.watch())
    await mine.wait_ready()
    await theirs.wait_ready()
    await flap(fleet_db, tenant.tenant_id, ["T-1"], 3)
    await mine.wait_events(3)
    marker = await emit(fleet_db, other.tenant_id, ["T-1"], Signal.ONLINE)
    await theirs.wait_events(1)
    assert theirs.ids == [marker[0].event_id]
    for watch in (mine, theirs):
        await watch.stop()


async def test_an_unrelated_long_transaction_does_not_hold_streams_back(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, db: Database
) -> None:
    await create_devices(client, ["LONG-1", "LONG-OTHER"])
    watch = Collector.start(client.connectivity.watch())
    await watch.wait_ready()
    # A write transaction that inserts no events stays open (it has a
    # transaction id older than the events'): only event writers are waited for.
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute(
            "UPDATE devices SET name = 'busy' WHERE tenant_id = $1 AND device_id = 'LONG-OTHER'",
            tenant.tenant_id,
        )
        sent = await flap(fleet_db, tenant.tenant_id, ["LONG-1"], 2)
        await watch.wait_events(2)
        assert watch.ids == [t.event_id for t in sent]
    await watch.stop()


async def test_a_group_narrowing_by_twin_conditions_reads_the_current_twin(
    client: pc.AsyncPulseClient, tenant: Tenant, fleet_db: Database, db: Database
) -> None:
    for device_id in ("T-OLD", "T-NEW", "T-NONE"):
        await client.devices.create(device_id)
    async with db.tenant(tenant.tenant_id) as con:
        for device_id, version in (("T-OLD", "2.3.1"), ("T-NEW", "2.4.0")):
            await con.execute(
                "UPDATE device_state SET reported = $2 WHERE tenant_id = $1 AND device_id = $3",
                tenant.tenant_id,
                {"fw": {"version": version}},
                device_id,
            )
        old_firmware = filters.canonical_json(
            filters.parse_filter(
                {
                    "twin_conditions": [
                        {
                            "document": "REPORTED",
                            "path": "fw.version",
                            "operator": "LESS",
                            "values": ["2.4"],
                        }
                    ]
                }
            )
        )
        await groups_store.create_group(
            con,
            tenant.tenant_id,
            group_id="old-fw",
            name="Old firmware",
            description="",
            group_type=groups_store.DYNAMIC,
            query_filter=old_firmware,
        )
    narrowed = Collector.start(client.connectivity.watch(group_id="old-fw"))
    await narrowed.wait_ready()
    sent = await emit(fleet_db, tenant.tenant_id, ["T-OLD", "T-NEW", "T-NONE"], Signal.ONLINE)
    # A later event of the member: anything wrongly let through before it
    # would have arrived first.
    sent += await emit(fleet_db, tenant.tenant_id, ["T-OLD"], Signal.OFFLINE)
    await narrowed.wait_events(2)
    assert narrowed.ids == [t.event_id for t in sent if t.device_id == "T-OLD"]
    await narrowed.stop()
