"""The connection pool and the tenant scope every tenant query runs in.

A tenant scope is one transaction that, in its first round trip, begins,
switches to the `pulse_app` role (which row-level security binds, even when
the login is a superuser) and sets `app.tenant_id`, both transaction-local,
so nothing outlives the transaction on a pooled connection. A scoped read is
then three round trips: begin+scope, the statement, commit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

APP_ROLE = "pulse_app"

#: What a lost or refused database connection raises: retryable, not a bug.
CONNECTION_LOST = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    ConnectionError,
    OSError,
)

if TYPE_CHECKING:
    # asyncpg-stubs makes these generic; at run time they are plain classes.
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    Pooled: TypeAlias = PoolConnectionProxy[asyncpg.Record]
else:
    Pooled = asyncpg.pool.PoolConnectionProxy
    Connection = asyncpg.Connection
    Pool = asyncpg.Pool


async def _init_connection(con: Connection) -> None:
    await con.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _reset_connection(con: Connection) -> None:
    # The default reset (RESET ALL, UNLISTEN, ...) costs a round trip per
    # release; scopes leave no session state behind, so only an interrupted
    # transaction needs cleaning up.
    if con.is_in_transaction():
        await con.execute("ROLLBACK")


async def create_pool(dsn: str, *, size: int) -> Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        init=_init_connection,
        reset=_reset_connection,
    )
    assert pool is not None
    return pool


def _begin_sql(tenant_id: uuid.UUID, *, readonly: bool) -> str:
    # One simple-protocol message instead of three round trips. The only value
    # in it is a uuid.UUID rendered by Python: 32 hex digits and dashes,
    # nothing that can close the literal.
    if not isinstance(tenant_id, uuid.UUID):
        raise TypeError("tenant_id must be a uuid.UUID")
    mode = " READ ONLY" if readonly else ""
    return (
        f"BEGIN{mode}; SET LOCAL ROLE {APP_ROLE}; "
        f"SELECT set_config('app.tenant_id', '{tenant_id}', true)"
    )


class Database:
    """The service's pool, handing out tenant-scoped transactions."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def tenant(
        self, tenant_id: uuid.UUID, *, readonly: bool = False
    ) -> AsyncIterator[Connection]:
        """A transaction in which only `tenant_id`'s rows exist."""
        con = await self._begin(_begin_sql(tenant_id, readonly=readonly))
        try:
            try:
                yield con
            except BaseException:
                if not con.is_closed():
                    await con.execute("ROLLBACK")
                raise
            await con.execute("COMMIT")
        finally:
            await self.pool.release(con)

    async def _begin(self, sql: str) -> Pooled:
        # A pooled connection may have been closed by the server (restart,
        # failover) since its last use; nothing has happened yet at BEGIN, so
        # one retry on a fresh connection is safe.
        for attempt in (1, 2):
            con = await self.pool.acquire()
            try:
                await con.execute(sql)
            except CONNECTION_LOST:
                await self.pool.release(con)
                if attempt == 2:
                    raise
                continue
            except BaseException:
                await self.pool.release(con)
                raise
            return con
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[Connection]:
        """A connection as the login itself, for cross-tenant administration."""
        async with self.pool.acquire() as con:
            yield con

    async def close(self) -> None:
        await self.pool.close()


def record_dict(record: asyncpg.Record) -> dict[str, Any]:
    return dict(record.items())
