"""WatchTwin over real gRPC: current twins, changes, resuming, gaps."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from pulse.device.v1 import twin_pb2, twin_pb2_grpc
from pulse_client import AsyncPulseClient, AsyncStream, InvalidArgument, NotFound, struct_to_dict

from server.app import RunningServer
from server.db import Database
from server.twin import store
from server.twin.notify import ChangeNotifier
from tests.conftest import Tenant
from tests.twin.conftest import create_devices


class Watch:
    """Reads a stream in the background, so waiting for the next twin with a
    timeout does not cancel the read (which would end the stream)."""

    def __init__(self, stream: AsyncStream[twin_pb2.Twin]) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[twin_pb2.Twin | BaseException] = asyncio.Queue()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for twin in self._stream:
                self._queue.put_nowait(twin)
        except Exception as error:
            self._queue.put_nowait(error)

    async def next(self) -> twin_pb2.Twin:
        item = await asyncio.wait_for(self._queue.get(), 10)
        if isinstance(item, BaseException):
            raise item
        return item

    async def nothing_more(self, seconds: float = 0.3) -> None:
        await asyncio.sleep(seconds)
        assert self._queue.empty(), self._queue.get_nowait()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stream.cancel()
        await self._task


async def test_current_twins_then_every_change(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A", "B", "C")
    async with Watch(client.twin.watch(["B", "A"])) as stream:
        first = [await stream.next(), await stream.next()]
        assert sorted(t.device_id for t in first) == ["A", "B"]
        await client.twin.update_desired("A", {"x": 1}, expected_version=0)
        await client.twin.update_desired("C", {"x": 1}, expected_version=0)  # not watched
        changed = await stream.next()
        assert (changed.device_id, changed.desired_version) == ("A", 1)
        assert changed.revision > first[[t.device_id for t in first].index("A")].revision
        # Reported state counts as a change too (stored and announced as
        # the evaluator does).
        async with db.tenant(tenant.tenant_id) as con:
            result = await store.ingest_reported(
                con, tenant.tenant_id, [store.Report("B", json.dumps({"up": True}), 0)]
            )
        notifier = ChangeNotifier(db)
        notifier.changed(tenant.tenant_id, result.changed)
        await notifier.flush()
        reported = await stream.next()
        assert reported.device_id == "B" and struct_to_dict(reported.reported) == {"up": True}
        await stream.nothing_more()


async def test_resuming_sends_only_what_is_newer(client: AsyncPulseClient, tenant: Tenant) -> None:
    await create_devices(client, "A", "B")
    a = await client.twin.update_desired("A", {"v": 1}, expected_version=0)
    b = await client.twin.get("B")
    await client.twin.update_desired("A", {"v": 2}, expected_version=1)
    # The caller had A at its first write and B as it is now.
    async with Watch(
        client.twin.watch(["A", "B"], resume_revisions={"A": a.revision, "B": b.revision})
    ) as stream:
        missed = await stream.next()
        assert (missed.device_id, missed.desired_version) == ("A", 2)
        await stream.nothing_more()
    # The single-device form the HTTP gateway fills from Last-Event-ID.
    request = twin_pb2.WatchTwinRequest(device_ids=["A"], resume_revision=missed.revision)
    call = twin_pb2_grpc.TwinServiceStub(client.channel).WatchTwin(
        request, metadata=[("authorization", f"Bearer {tenant.token()}")]
    )
    async with Watch(AsyncStream(call)) as stream:
        await stream.nothing_more()
        await client.twin.update_desired("A", {"v": 3}, expected_version=2)
        assert (await stream.next()).desired_version == 3


async def test_a_watcher_that_falls_behind_skips_to_the_latest(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A", "B")
    async with Watch(client.twin.watch("A")) as stream:
        initial = await stream.next()
        # Three changes of A, then 400 of B (unwatched), each announced on
        # its own, as 403 separate writers would: more notifications than a
        # watcher queues (256). The overflow drops the queued ones, A's
        # included, for a gap: only re-reading after the gap finds A's change.
        changes = []
        async with db.tenant(tenant.tenant_id) as con:
            for device_id, count in (("A", 3), ("B", 400)):
                for n in range(count):
                    record = await store.write_desired(
                        con, tenant.tenant_id, device_id, {"n": n}, expected_version=n
                    )
                    changes.append((device_id, record.revision))
        channel = store.channel(tenant.tenant_id)
        async with db.admin() as con:
            await store.notify(con, [(channel, f"{d}:{r}") for d, r in changes])
        latest = await stream.next()
        assert latest.desired_version == 3
        assert latest.revision == initial.revision + 3
        await stream.nothing_more()


async def test_a_lost_listen_connection_loses_no_change(
    client: AsyncPulseClient, running: RunningServer, dsn: str
) -> None:
    await create_devices(client, "A")
    async with Watch(client.twin.watch("A")) as stream:
        await stream.next()
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
            )
        finally:
            await admin.close()
        # Written while the server may not be listening: the reconnect's gap
        # makes the watcher re-read.
        await client.twin.update_desired("A", {"v": 1}, expected_version=0)
        assert (await stream.next()).desired_version == 1
        await asyncio.wait_for(running.listener.ready.wait(), 10)
        await client.twin.update_desired("A", {"v": 2}, expected_version=1)
        assert (await stream.next()).desired_version == 2


async def test_bad_watch_requests(client: AsyncPulseClient) -> None:
    await create_devices(client, "A")
    with pytest.raises(NotFound) as not_found:
        async with Watch(client.twin.watch(["A", "NOPE"])) as stream:
            await stream.next()
    assert not_found.value.metadata == {"device": "NOPE"}
    bad = {
        "device_ids": ([], None),
        "device_ids[0]": (["bad id"], None),
        "resume_revisions['B']": (["A"], {"B": 1}),
    }
    for field, (ids, resume) in bad.items():
        with pytest.raises(InvalidArgument) as caught:
            async with Watch(client.twin.watch(ids, resume_revisions=resume)) as stream:
                await stream.next()
        assert caught.value.field_violations[0].field == field
    with pytest.raises(InvalidArgument):
        async with Watch(client.twin.watch(["A", "A"])) as stream:
            await stream.next()
    with pytest.raises(InvalidArgument):
        async with Watch(client.twin.watch([f"D{n}" for n in range(101)])) as stream:
            await stream.next()
