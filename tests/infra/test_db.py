"""The tenant scope survives connections the server has closed, says when a
lost connection leaves a commit's outcome unknown, and never hands a read's
session scope on to the next checkout."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from server.db import Connection, Database, _session_scope_sql, create_pool
from server.transient import CommitOutcomeUnknown, is_connection_lost
from tests.conftest import FleetFactory, Tenant


async def _terminate(dsn: str, pids: list[int], *, wait: bool = True) -> None:
    """pg_terminate_backend; with `wait`, until the backends are gone."""
    admin = await asyncpg.connect(dsn)
    try:
        for pid in pids:
            timeout_ms = 5000 if wait else 0
            assert await admin.fetchval("SELECT pg_terminate_backend($1, $2)", pid, timeout_ms)
    finally:
        await admin.close()


async def test_a_pooled_connection_killed_by_the_server_is_replaced(
    dsn: str, tenant: Tenant
) -> None:
    db = Database(await create_pool(dsn, size=1))
    try:
        async with db.tenant(tenant.tenant_id) as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
        # Not waiting races the server's goodbye (a FATAL message, then the
        # end of the stream) against the next checkout, as in production.
        await _terminate(dsn, [pid], wait=False)
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
            assert await con.fetchval("SELECT current_setting('app.tenant_id')") == str(
                tenant.tenant_id
            )
    finally:
        await db.close()


async def test_a_pool_whose_every_connection_was_killed_recovers_at_once(
    dsn: str, tenant: Tenant
) -> None:
    """What a restart or failover looks like: every idle connection is dead."""
    size = 4
    db = Database(await create_pool(dsn, size=size))
    try:
        held = asyncio.Barrier(size)

        async def backend_pid() -> int:
            async with db.tenant(tenant.tenant_id, readonly=True) as con:
                await held.wait()  # so that the pool opens `size` connections
                pid: int = await con.fetchval("SELECT pg_backend_pid()")
                return pid

        old = await asyncio.gather(*(backend_pid() for _ in range(size)))
        await _terminate(dsn, old)
        held = asyncio.Barrier(size)
        new = await asyncio.gather(*(backend_pid() for _ in range(size)))
        assert not set(new) & set(old)
    finally:
        await db.close()


async def test_a_connection_lost_during_commit(dsn: str, tenant: Tenant) -> None:
    """A write's outcome is then unknown (never to be retried blindly)."""
    db = Database(await create_pool(dsn, size=1))
    try:
        with pytest.raises(Exception) as raised:
            async with db.tenant(tenant.tenant_id) as con:
                await _terminate(dsn, [await con.fetchval("SELECT pg_backend_pid()")])
        assert is_connection_lost(raised.value)
        assert isinstance(raised.value, CommitOutcomeUnknown)
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT 1") == 1
    finally:
        await db.close()


async def test_a_connection_lost_after_a_read_costs_the_read_nothing(
    dsn: str, tenant: Tenant
) -> None:
    """A read commits nothing, so what it read stands; the dead connection
    is left behind at the next scope's first message."""
    db = Database(await create_pool(dsn, size=1))
    try:
        async with db.tenant(tenant.tenant_id, readonly=True) as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
            await _terminate(dsn, [pid])
        async with db.tenant(tenant.tenant_id, readonly=True) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await db.close()


async def test_a_connection_lost_inside_the_scope_is_discarded(dsn: str, tenant: Tenant) -> None:
    """The original error is raised (not one from a ROLLBACK on a dead
    connection), and the pool does not keep the connection."""
    db = Database(await create_pool(dsn, size=1))
    try:
        with pytest.raises(Exception) as raised:
            async with db.tenant(tenant.tenant_id) as con:
                pid = await con.fetchval("SELECT pg_backend_pid()")
                await _terminate(dsn, [pid])
                await con.fetchval("SELECT 1")
        assert is_connection_lost(raised.value)
        assert not isinstance(raised.value, CommitOutcomeUnknown)
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await db.close()


_STATE = """
SELECT current_user AS role,
       coalesce(current_setting('app.tenant_id', true), '') AS tenant,
       current_setting('transaction_read_only') AS read_only,
       array(SELECT device_id FROM devices ORDER BY device_id) AS devices
"""
_STATE_DEVICES = "SELECT array(SELECT device_id FROM devices ORDER BY device_id)"


async def test_a_read_scope_never_reaches_the_next_checkout(
    dsn: str, seed_fleet_tenant: FleetFactory
) -> None:
    """On one pooled connection, whatever comes after a read sees its own
    scope and nothing of the read's: another tenant's read or write, the
    login itself, a transaction of another role."""
    a = await seed_fleet_tenant(["A-1"])
    b = await seed_fleet_tenant(["B-1"])
    db = Database(await create_pool(dsn, size=1))

    async def state(con: Connection, sql: str = _STATE) -> asyncpg.Record:
        row = await con.fetchrow(sql)
        assert row is not None
        return row

    async def read(tenant: uuid.UUID) -> asyncpg.Record:
        async with db.tenant(tenant, readonly=True) as con:
            return await state(con)

    try:
        first = await read(a)
        assert (first["role"], first["tenant"], first["read_only"]) == ("pulse_app", str(a), "on")
        assert first["devices"] == ["A-1"]
        assert (await read(b))["devices"] == ["B-1"]

        await read(a)
        async with db.tenant(b) as con:
            write = await state(con)
            await con.execute("UPDATE devices SET name = 'written' WHERE device_id = 'B-1'")
            # Row-level security: tenant b's B-1 only.
        assert (write["role"], write["tenant"], write["read_only"]) == ("pulse_app", str(b), "off")
        assert write["devices"] == ["B-1"]

        await read(a)
        async with db.admin() as con:
            login = await state(con)
            named = "SELECT name FROM devices WHERE tenant_id = $1 AND device_id = 'B-1'"
            assert await con.fetchval(named, b) == "written"
        assert login["role"] != "pulse_app"
        assert (login["tenant"], login["read_only"]) == ("", "off")
        assert {"A-1", "B-1"} <= set(login["devices"])

        await read(a)
        async with db.transaction("BEGIN READ ONLY; SET LOCAL ROLE pulse_evaluator") as con:
            other = await state(con)
        assert (other["role"], other["tenant"]) == ("pulse_evaluator", "")

        async with db.tenant(a, readonly=True) as con:
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await con.execute("UPDATE devices SET name = 'no' WHERE device_id = 'A-1'")
    finally:
        await db.close()


async def test_a_read_sends_its_scope_only_where_the_session_lacks_it(
    dsn: str, seed_fleet_tenant: FleetFactory
) -> None:
    """A connection whose session already carries a tenant's read scope reads
    that tenant in one round trip; every other hand-over sets it again."""
    a = await seed_fleet_tenant(["A-1"])
    b = await seed_fleet_tenant(["B-1"])
    db = Database(await create_pool(dsn, size=1))
    sent: list[str] = []

    async def read(tenant: uuid.UUID) -> list[str]:
        """What the read sent, and the devices it saw."""
        sent.clear()
        async with db.tenant(tenant, readonly=True) as con:
            devices: list[str] = await con.fetchval(_STATE_DEVICES)
        assert sent[-1] == _STATE_DEVICES
        return [*sent[:-1], *devices]

    try:
        async with db.admin() as con:
            con.add_query_logger(lambda query: sent.append(query.query))
        scope_a, scope_b = (
            _session_scope_sql(a, readonly=True),
            _session_scope_sql(b, readonly=True),
        )

        assert await read(a) == [scope_a, "A-1"]
        assert await read(a) == ["A-1"]
        assert await read(b) == [scope_b, "B-1"]
        assert await read(b) == ["B-1"]

        # A write's scope is transaction-local: its end restores the read's.
        async with db.tenant(a) as con:
            await con.execute("UPDATE devices SET name = 'written' WHERE device_id = 'A-1'")
        assert await read(b) == ["B-1"]

        # A failed read keeps the scope it had.
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            async with db.tenant(b, readonly=True) as con:
                await con.execute("UPDATE devices SET name = 'no' WHERE device_id = 'B-1'")
        assert await read(b) == ["B-1"]

        async with db.admin():
            pass
        assert await read(b) == [scope_b, "B-1"]
        async with db.transaction("BEGIN READ ONLY; SET LOCAL ROLE pulse_evaluator"):
            pass
        assert await read(b) == [scope_b, "B-1"]
    finally:
        await db.close()


async def test_a_one_statement_write_commits_by_itself_in_its_tenant_only(
    dsn: str, seed_fleet_tenant: FleetFactory
) -> None:
    a = await seed_fleet_tenant(["A-1"])
    b = await seed_fleet_tenant(["B-1"])
    db = Database(await create_pool(dsn, size=1))
    sent: list[str] = []
    rename = "UPDATE devices SET name = 'written' WHERE device_id IN ('A-1', 'B-1')"

    async def write() -> tuple[list[str], asyncpg.Record]:
        """What the write sent besides its statements, and the state it ran in."""
        sent.clear()
        async with db.one_statement(a) as con:
            assert await con.execute(rename) == "UPDATE 1"  # A-1 only
            assert not con.is_in_transaction()
            row = await con.fetchrow(_STATE)
        assert row is not None
        return sent[:-2], row

    try:
        async with db.admin() as con:
            con.add_query_logger(lambda query: sent.append(query.query))
        write_scope = _session_scope_sql(a, readonly=False)

        assert (await write())[0] == [write_scope]
        scripts, state = await write()
        assert scripts == []
        assert (state["role"], state["tenant"], state["read_only"]) == ("pulse_app", str(a), "off")

        async with db.tenant(a, readonly=True):
            pass  # the session now has a's read scope
        assert (await write())[0] == [write_scope]

        async with db.admin() as con:
            names = await con.fetch(
                "SELECT device_id, name FROM devices WHERE tenant_id = ANY($1)", [a, b]
            )
        assert {r["device_id"]: r["name"] for r in names} == {"A-1": "written", "B-1": "B-1"}
    finally:
        await db.close()


async def test_a_connection_lost_during_a_one_statement_write_leaves_its_outcome_unknown(
    dsn: str, tenant: Tenant
) -> None:
    db = Database(await create_pool(dsn, size=1))
    try:
        with pytest.raises(CommitOutcomeUnknown):
            async with db.one_statement(tenant.tenant_id) as con:
                pid = await con.fetchval("SELECT pg_backend_pid()")
                await _terminate(dsn, [pid])
                await con.execute("UPDATE devices SET name = name")
        async with db.one_statement(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await db.close()
