"""WatchGroupMembership: devices entering and leaving groups, with their
causes, resumable without gap or duplicate, ended by the group's deletion."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pulse_client as pc
import pytest
from pulse.device.v1 import groups_pb2

from server import config
from server.app import start
from server.connectivity import retention
from server.db import Database
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.groups.helpers import (
    evaluated_members,
    insert_rows,
    maintained_members,
    row,
    set_status,
)
from tests.helpers import eventually

Message = groups_pb2.WatchGroupMembershipResponse
Step = tuple[str, str, str]  # (device id, ENTERED / LEFT, cause)

pytestmark = pytest.mark.timeout(60)


def step(message: Message) -> Step:
    return (
        message.device_id,
        Message.EventType.Name(message.event_type),
        Message.Cause.Name(message.cause),
    )


def per_device(steps: list[Step]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for device_id, event_type, cause in steps:
        out.setdefault(device_id, []).append((event_type, cause))
    return out


class Watch:
    """A membership stream read in the background."""

    def __init__(self, stream: pc.AsyncStream[Message]) -> None:
        self.stream = stream
        self.messages: list[Message] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.stream:
                self.messages.append(message)
        except pc.PulseError as error:
            self.error = error

    @property
    def steps(self) -> list[Step]:
        return [step(m) for m in self.messages if m.event_type]

    @property
    def cursor(self) -> str:
        return next(m.cursor for m in reversed(self.messages) if m.cursor)

    async def until(self, *expected: Step) -> None:
        """Wait for exactly these events. Changes the maintainer evaluates
        together come in device order, so only each device's own order is
        compared."""
        want = per_device(list(expected))
        try:
            await eventually(lambda: per_device(self.steps) == want, what="the events")
        except pytest.fail.Exception:
            pytest.fail(f"expected {expected}, got {self.steps} ({self.error!r})")

    async def stop(self) -> None:
        self.stream.cancel()
        await self.task


@pytest.fixture
async def watches(client: pc.AsyncPulseClient) -> AsyncIterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for watch in opened:
        await watch.stop()


def open_watch(
    client: pc.AsyncPulseClient, watches: list[Watch], group_id: str, cursor: str = ""
) -> Watch:
    request = groups_pb2.WatchGroupMembershipRequest(group_id=group_id, resume_cursor=cursor)
    stream = client._rpc.stream(client.groups._stub.WatchGroupMembership, request)
    watch = Watch(stream)
    watches.append(watch)
    return watch


async def settled(
    db: Database, client: pc.AsyncPulseClient, tenant_id: uuid.UUID, group_id: str
) -> None:
    """Wait until the maintainer's memberships equal the group's members
    evaluated whole, and ListGroupMembers shows them."""

    async def same() -> bool:
        listed = {m.device_id async for m in client.groups.members(group_id)}
        evaluated = await evaluated_members(client, group_id)
        return set(await maintained_members(db, tenant_id, group_id)) == listed == evaluated

    await eventually(same, what=f"group {group_id} evaluated")


async def test_a_new_watch_starts_with_the_members_then_follows_status(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, watches: list[Watch]
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("A"), row("B", status="OFFLINE"), row("C")])
    await client.groups.create_dynamic("online", pc.where(statuses=["ONLINE"]), group_id="on")
    await settled(db, client, tenant.tenant_id, "on")

    watch = open_watch(client, watches, "on")
    await watch.until(("A", "ENTERED", "CURRENT_MEMBER"), ("C", "ENTERED", "CURRENT_MEMBER"))
    await eventually(lambda: bool(watch.messages[-1].cursor), what="the bookmark")
    assert [m.cursor for m in watch.messages[:2]] == ["", ""]

    await set_status(db, tenant.tenant_id, ["A"], "OFFLINE")
    await set_status(db, tenant.tenant_id, ["B"], "ONLINE")
    await watch.until(
        ("A", "ENTERED", "CURRENT_MEMBER"),
        ("C", "ENTERED", "CURRENT_MEMBER"),
        ("A", "LEFT", "STATUS"),
        ("B", "ENTERED", "STATUS"),
    )
    assert all(m.cursor and m.HasField("occurred_at") for m in watch.messages[3:])


async def test_a_write_in_flight_when_the_first_group_is_created_is_not_missed(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient
) -> None:
    """The journal triggers queue nothing for a tenant without dynamic groups,
    so a status change whose trigger ran before the first group existed must
    still be in that group's first evaluation, however late it commits."""
    await insert_rows(db, tenant.tenant_id, [row("A"), row("B")])
    async with db.tenant(tenant.tenant_id) as con:  # one transaction, held open
        await con.execute(
            "UPDATE device_state SET status = 'OFFLINE' WHERE tenant_id = $1 AND device_id = 'A'",
            tenant.tenant_id,
        )
        create = asyncio.create_task(
            client.groups.create_dynamic("online", pc.where(statuses=["ONLINE"]), group_id="on")
        )
        # Time enough for the maintainer (50 ms polls) to evaluate the group
        # with A still online, had the creation not waited for this write.
        await asyncio.sleep(1.0)
        waited = not create.done()
    await create
    await settled(db, client, tenant.tenant_id, "on")
    assert await maintained_members(db, tenant.tenant_id, "on") == ["B"]
    assert waited


async def test_device_writes_do_not_wait_for_a_new_group_to_be_counted(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient
) -> None:
    """Creating a dynamic group takes the tenant's membership lock, which
    every device write waits for; the member count it returns (the filter
    evaluated whole: seconds for a twin condition over a large fleet) is
    read after that lock is gone. The count is held up here by a lock on
    device_state, which the group's own transaction never touches."""
    await insert_rows(db, tenant.tenant_id, [row("A", reported={"mode": "eco"}), row("B")])
    eco = pc.where(pc.reported("mode").eq("eco"))
    async with db.admin() as con, con.transaction():
        await con.execute("LOCK TABLE device_state IN ACCESS EXCLUSIVE MODE")
        create = asyncio.create_task(client.groups.create_dynamic("eco", eco, group_id="eco"))
        async with db.admin() as other:

            async def committed() -> bool:
                groups = await other.fetchval(
                    "SELECT count(*) FROM device_groups WHERE tenant_id = $1", tenant.tenant_id
                )
                return bool(groups == 1)

            await eventually(committed, what="the group's commit before its count")
            free = await other.fetchval(
                "SELECT pg_try_advisory_xact_lock_shared(28782, membership_lock_key($1))",
                tenant.tenant_id,
            )
        counting = not create.done()
    group = await create
    assert free and counting
    assert group.member_count == 1


async def test_every_cause(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, watches: list[Watch]
) -> None:
    await client.sites.create("s1")
    await client.devices.create("T-1", tags={"tier": "gold"})
    await client.devices.create("T-2", tags={"tier": "gold"})
    gold = {"tag_selectors": [{"key": "tier", "operator": "EQUALS", "values": ["gold"]}]}
    await client.groups.create_dynamic("gold", gold, group_id="gold")
    twin = {"twin_conditions": [{"document": "DESIRED", "path": "mode", "operator": "EXISTS"}]}
    await client.groups.create_dynamic("configured", twin, group_id="conf")
    await client.groups.create_static("picked", group_id="picked")
    await settled(db, client, tenant.tenant_id, "gold")
    gold_watch = open_watch(client, watches, "gold")
    conf_watch = open_watch(client, watches, "conf")
    picked_watch = open_watch(client, watches, "picked")
    await gold_watch.until(
        ("T-1", "ENTERED", "CURRENT_MEMBER"), ("T-2", "ENTERED", "CURRENT_MEMBER")
    )

    await client.devices.update("T-1", tags={"tier": "silver"})
    await client.devices.create("T-3", tags={"tier": "gold"})
    await client.devices.decommission("T-2")
    await client.twin.update_desired("T-3", {"mode": "eco"}, force=True)
    await client.groups.add_members("picked", ["T-1", "T-3"])
    await picked_watch.until(("T-1", "ENTERED", "GROUP_EDIT"), ("T-3", "ENTERED", "GROUP_EDIT"))
    await client.groups.remove_members("picked", ["T-1"])

    await gold_watch.until(
        ("T-1", "ENTERED", "CURRENT_MEMBER"),
        ("T-2", "ENTERED", "CURRENT_MEMBER"),
        ("T-1", "LEFT", "TAGS"),
        ("T-3", "ENTERED", "DEVICE_CREATED"),
        ("T-2", "LEFT", "DEVICE_DECOMMISSIONED"),
    )
    await conf_watch.until(("T-3", "ENTERED", "TWIN"))
    await picked_watch.until(
        ("T-1", "ENTERED", "GROUP_EDIT"),
        ("T-3", "ENTERED", "GROUP_EDIT"),
        ("T-1", "LEFT", "GROUP_EDIT"),
    )

    # Editing the filter emits the difference, and only that.
    group = await client.groups.get("gold")
    silver = {"tag_selectors": [{"key": "tier", "operator": "EQUALS", "values": ["silver"]}]}
    await client.groups.update("gold", expected_version=group.version, query_filter=silver)
    await gold_watch.until(
        ("T-1", "ENTERED", "CURRENT_MEMBER"),
        ("T-2", "ENTERED", "CURRENT_MEMBER"),
        ("T-1", "LEFT", "TAGS"),
        ("T-3", "ENTERED", "DEVICE_CREATED"),
        ("T-2", "LEFT", "DEVICE_DECOMMISSIONED"),
        ("T-1", "ENTERED", "GROUP_EDIT"),
        ("T-3", "LEFT", "GROUP_EDIT"),
    )


async def test_resuming_misses_and_repeats_nothing(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, watches: list[Watch]
) -> None:
    await insert_rows(db, tenant.tenant_id, [row(f"R-{i}") for i in range(6)])
    await client.groups.create_dynamic("online", pc.where(statuses=["ONLINE"]), group_id="on")
    await settled(db, client, tenant.tenant_id, "on")
    first = open_watch(client, watches, "on")
    await eventually(lambda: len(first.messages) == 7, what="members and bookmark")
    start = first.cursor

    await set_status(db, tenant.tenant_id, ["R-0", "R-1"], "OFFLINE")
    await eventually(lambda: len(first.steps) == 8, what="the first changes")
    middle = first.cursor
    await set_status(db, tenant.tenant_id, ["R-0"], "ONLINE")
    await set_status(db, tenant.tenant_id, ["R-5"], "STALE")
    await eventually(lambda: len(first.steps) == 10, what="the later changes")
    changes = first.steps[6:]
    assert per_device(changes) == per_device(
        [
            ("R-0", "LEFT", "STATUS"),
            ("R-1", "LEFT", "STATUS"),
            ("R-0", "ENTERED", "STATUS"),
            ("R-5", "LEFT", "STATUS"),
        ]
    )

    from_start = open_watch(client, watches, "on", start)
    from_middle = open_watch(client, watches, "on", middle)
    await from_start.until(*changes)
    await from_middle.until(*changes[2:])
    assert from_start.steps == changes

    # A cursor names a place in one group's stream.
    await client.groups.create_static("other", group_id="other")
    other = open_watch(client, watches, "other", middle)
    await other.task
    assert isinstance(other.error, pc.InvalidArgument)
    assert "resume_cursor" in str(other.error)


async def test_deleting_the_group_ends_the_stream(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, watches: list[Watch]
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("D-1")])
    await client.groups.create_dynamic("all", {}, group_id="all")
    await settled(db, client, tenant.tenant_id, "all")
    watch = open_watch(client, watches, "all")
    await watch.until(("D-1", "ENTERED", "CURRENT_MEMBER"))
    await client.groups.delete("all")
    await asyncio.wait_for(watch.task, 10)
    assert isinstance(watch.error, pc.NotFound)
    assert "was deleted" in str(watch.error)

    missing = open_watch(client, watches, "all")
    await missing.task
    assert isinstance(missing.error, pc.NotFound)


async def test_sync_status_turning_stale_with_time(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, watches: list[Watch]
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("S-1")])
    await client.groups.create_dynamic("pending", {"sync_statuses": ["PENDING"]}, group_id="p")
    await client.twin.update_desired("S-1", {"valve": "open"}, force=True)
    watch = open_watch(client, watches, "p")
    await eventually(lambda: bool(watch.steps), what="S-1 pending")
    assert watch.steps[-1][:2] == ("S-1", "ENTERED")

    # The maintainer set a timer for when PENDING turns STALE (the server's
    # threshold is 300 s); move the write and its timer into the past.
    async with db.tenant(tenant.tenant_id) as con:
        due = await con.fetchval(
            "SELECT due_at - desired_updated_at FROM membership_timers t JOIN device_state s"
            " USING (tenant_id, device_id) WHERE device_id = 'S-1'"
        )
        assert due == timedelta(seconds=300, milliseconds=1)
        past = datetime.now(UTC) - timedelta(minutes=10)
        await con.execute("UPDATE membership_timers SET due_at = $1 WHERE device_id = 'S-1'", past)
    async with db.admin() as con, con.transaction():
        # Triggers off for this transaction only: no twin change is queued,
        # so only the timer can move the device.
        await con.execute("SET LOCAL session_replication_role = replica")
        await con.execute(
            "UPDATE device_state SET desired_updated_at = $1 WHERE tenant_id = $2",
            past,
            tenant.tenant_id,
        )
    await eventually(lambda: watch.steps[-1] == ("S-1", "LEFT", "SYNC_TIMEOUT"), what="STALE")


async def test_the_typed_client_and_server_sent_events(
    db: Database,
    tenant: Tenant,
    client: pc.AsyncPulseClient,
    http: httpx.AsyncClient,
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("H-1"), row("H-2", status="OFFLINE")])
    await client.groups.create_dynamic("online", pc.where(statuses=["ONLINE"]), group_id="on")
    await settled(db, client, tenant.tenant_id, "on")

    async with client.groups.watch_membership("on") as watch:
        first = await anext(watch)
        assert step(first) == ("H-1", "ENTERED", "CURRENT_MEMBER")
        await set_status(db, tenant.tenant_id, ["H-2"], "ONLINE")
        second = await anext(watch)
        assert step(second) == ("H-2", "ENTERED", "STATUS")
        assert watch.cursor == second.cursor

    headers = {"Authorization": f"Bearer {tenant.token()}", "Accept": "text/event-stream"}
    url = "/customer/device-groups/on/membership:watch"
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        seen: list[str] = []
        async for line in lines:
            seen.append(line)
            if line.startswith("id: "):
                break
    text = "\n".join(seen)
    assert '"device_id":"H-1"' in text and '"CURRENT_MEMBER"' in text
    assert '"device_id":"H-2"' in text


async def test_the_typed_client_resumes_across_a_server_restart(
    db: Database,
    tenant: Tenant,
    client: pc.AsyncPulseClient,
    settings: config.Settings,
    dsn: str,
) -> None:
    await insert_rows(db, tenant.tenant_id, [row(f"X-{i}", status="OFFLINE") for i in range(4)])
    await client.groups.create_dynamic("online", pc.where(statuses=["ONLINE"]), group_id="on")
    await settled(db, client, tenant.tenant_id, "on")
    port = free_port()
    ours = dataclasses.replace(settings, grpc_port=port, db_pool_size=2)
    server = await start(ours, dsn)
    try:
        async with await pc.AsyncPulseClient.connect(
            f"127.0.0.1:{port}", token=tenant.token()
        ) as other:
            await set_status(db, tenant.tenant_id, ["X-0"], "ONLINE")
            await settled(db, client, tenant.tenant_id, "on")
            watch = other.groups.watch_membership("on")
            seen = [step(await anext(watch))]
            await set_status(db, tenant.tenant_id, ["X-1"], "ONLINE")
            seen.append(step(await anext(watch)))

            await server.stop(grace=1)
            # While no server is up (the session's own maintainer keeps
            # evaluating), the group changes.
            await set_status(db, tenant.tenant_id, ["X-0"], "OFFLINE")
            await set_status(db, tenant.tenant_id, ["X-2"], "ONLINE")
            server = await start(ours, dsn)
            await set_status(db, tenant.tenant_id, ["X-3"], "ONLINE")
            seen += [step(await anext(watch)) for _ in range(3)]
            assert watch.reconnects >= 1
            watch.cancel()
    finally:
        await server.stop(grace=1)
    assert per_device(seen) == per_device(
        [
            ("X-0", "ENTERED", "CURRENT_MEMBER"),
            ("X-1", "ENTERED", "STATUS"),
            ("X-0", "LEFT", "STATUS"),
            ("X-2", "ENTERED", "STATUS"),
            ("X-3", "ENTERED", "STATUS"),
        ]
    )
    assert {m.device_id async for m in client.groups.members("on")} == {"X-1", "X-2", "X-3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_other_tenants_groups_and_bad_requests_are_refused(
    db: Database,
    tenant: Tenant,
    client: pc.AsyncPulseClient,
    make_tenant: TenantFactory,
    connect: ClientFactory,
    watches: list[Watch],
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("I-1")])
    await client.groups.create_dynamic("all", {}, group_id="all")
    await settled(db, client, tenant.tenant_id, "all")
    mine = open_watch(client, watches, "all")
    await mine.until(("I-1", "ENTERED", "CURRENT_MEMBER"))
    await eventually(lambda: bool(mine.messages[-1].cursor), what="the bookmark")

    other_tenant = await make_tenant()
    other = await connect(other_tenant.token())
    await other.groups.create_static("all", group_id="all")
    theirs = open_watch(other, watches, "all")
    await eventually(lambda: bool(theirs.messages), what="their bookmark")
    assert theirs.steps == []  # their group of the same id is theirs alone
    with_my_cursor = open_watch(other, watches, "all", mine.cursor)
    unknown = open_watch(other, watches, "nope")
    bad_id = open_watch(client, watches, "no spaces")
    garbage = open_watch(client, watches, "all", "not-a-cursor")
    for watch, error in (
        (with_my_cursor, pc.InvalidArgument),
        (unknown, pc.NotFound),
        (bad_id, pc.InvalidArgument),
        (garbage, pc.InvalidArgument),
    ):
        await asyncio.wait_for(watch.task, 10)
        assert isinstance(watch.error, error), watch.error


async def test_retention_removes_old_membership_events(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, dsn: str
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("O-1")])
    await client.groups.create_dynamic("all", {}, group_id="all")
    await settled(db, client, tenant.tenant_id, "all")
    assert await stored_count(db, tenant.tenant_id) == 1
    later = datetime.now(UTC) + timedelta(days=10)
    kept = await retention.purge(dsn, older_than_days=30, now=later, log_table="membership_events")
    assert kept == 0
    removed = await retention.purge(
        dsn, older_than_days=7, now=later, log_table="membership_events"
    )
    assert removed >= 1
    assert await stored_count(db, tenant.tenant_id) == 0


async def stored_count(db: Database, tenant_id: uuid.UUID) -> int:
    async with db.tenant(tenant_id, readonly=True) as con:
        return int(await con.fetchval("SELECT count(*) FROM membership_events"))


async def test_the_blocking_client_watches_too(
    db: Database, tenant: Tenant, client: pc.AsyncPulseClient, target: str
) -> None:
    await insert_rows(db, tenant.tenant_id, [row("B-1"), row("B-2", status="OFFLINE")])
    await client.groups.create_dynamic("online", pc.where(statuses=["ONLINE"]), group_id="on")
    await settled(db, client, tenant.tenant_id, "on")

    def watch() -> tuple[list[Step], str]:
        with (
            pc.PulseClient.connect(target, token=tenant.token()) as blocking,
            blocking.groups.watch_membership("on") as membership,
        ):
            steps = [step(next(membership))]
            # Moved from this thread, while the watch waits for it.
            asyncio.run_coroutine_threadsafe(
                set_status(db, tenant.tenant_id, ["B-2"], "ONLINE"), loop
            ).result(10)
            steps.append(step(next(membership)))
            return steps, membership.cursor

    loop = asyncio.get_running_loop()
    steps, cursor = await asyncio.to_thread(watch)
    assert steps == [("B-1", "ENTERED", "CURRENT_MEMBER"), ("B-2", "ENTERED", "STATUS")]
    assert cursor
