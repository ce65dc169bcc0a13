"""The connection pool and the tenant scope every tenant query runs in.

A tenant scope is one transaction that, in its first round trip, begins,
switches to the `pulse_app` role (which row-level security binds, even when
the login is a superuser) and sets `app.tenant_id`, both transaction-local,
so nothing outlives the transaction on a pooled connection. A scoped read is
then three round trips: begin+scope, the statement, commit.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from server.observability import metrics, tracing
from server.transient import CommitOutcomeUnknown, is_connection_lost

APP_ROLE = "pulse_app"

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


def _begin_sql(tenant_id: uuid.UUID, *, readonly: bool, snapshot: bool = False) -> str:
    # One simple-protocol message instead of three round trips. The values in
    # it are a uuid.UUID rendered by Python (32 hex digits and dashes) and,
    # in a traced write, a traceparent that `tracing.traceparent` checked is
    # hex digits and dashes: nothing that can close the literal.
    if not isinstance(tenant_id, uuid.UUID):
        raise TypeError("tenant_id must be a uuid.UUID")
    mode = (" ISOLATION LEVEL REPEATABLE READ" if snapshot else "") + (
        " READ ONLY" if readonly else ""
    )
    # A write's outbox rows keep its trace (migrations/0012).
    traced = None if readonly else tracing.traceparent()
    trace_setting = f", set_config('pulse.traceparent', '{traced}', true)" if traced else ""
    return (
        f"BEGIN{mode}; SET LOCAL ROLE {APP_ROLE}; "
        f"SELECT set_config('app.tenant_id', '{tenant_id}', true){trace_setting}"
    )


class Database:
    """The service's pool, handing out tenant-scoped transactions.

    `name` labels the pool's metrics (server, evaluator, rollouts, ...):
    connections in use, tasks waiting for one and the time they wait."""

    def __init__(self, pool: Pool, *, name: str = "main") -> None:
        self.pool = pool
        self._size = pool.get_max_size()
        self._max = metrics.DB_POOL_MAX.labels(name)
        self._in_use = metrics.DB_POOL_IN_USE.labels(name)
        self._waiting = metrics.DB_POOL_WAITING.labels(name)
        self._acquire_s = metrics.DB_POOL_ACQUIRE_SECONDS.labels(name)
        self._max.inc(self._size)
        self._closed = False

    async def _acquire(self) -> Pooled:
        """A connection, counted in use until `_release` or `_lost`."""
        self._waiting.inc()
        start = time.perf_counter()
        try:
            con = await self.pool.acquire()
        finally:
            self._waiting.dec()
        self._acquire_s.observe(time.perf_counter() - start)
        self._in_use.inc()
        return con

    async def _release(self, con: Pooled) -> None:
        self._in_use.dec()
        await self.pool.release(con)

    def _lost(self, con: Pooled) -> None:
        """`con` is not going back to the pool: its connection is ended."""
        self._in_use.dec()
        _terminate(con)

    def tenant(
        self, tenant_id: uuid.UUID, *, readonly: bool = False, snapshot: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A transaction in which only `tenant_id`'s rows exist; with
        `snapshot`, every statement sees the database as of when it began
        (REPEATABLE READ, the snapshot taken by the BEGIN script itself)."""
        return self.transaction(
            _begin_sql(tenant_id, readonly=readonly, snapshot=snapshot), readonly=readonly
        )

    @asynccontextmanager
    async def transaction(self, begin: str, *, readonly: bool = False) -> AsyncIterator[Connection]:
        """A transaction opened by `begin`, one simple-protocol script starting
        with BEGIN, and committed when the block ends.

        Raises CommitOutcomeUnknown when the connection is lost during the
        COMMIT of a read-write transaction.
        """
        con = await self._begin(begin)
        try:
            try:
                yield con
            except BaseException as error:
                await _abandon(con, error)
                raise
            await _commit(con, readonly=readonly)
        finally:
            # A no-op for a connection already terminated.
            await self._release(con)

    async def _begin(self, sql: str) -> Pooled:
        # A pooled connection may have been closed by the server (restart,
        # failover, pg_terminate_backend) while idle. Nothing has happened yet
        # at BEGIN, so it is discarded and BEGIN tried on another; the pool
        # holds at most max_size such connections, then makes a fresh one.
        # Errors acquiring (connecting) are not retried here: the server is
        # down, and the caller's retry policy decides.
        attempts = self.pool.get_max_size() + 1
        for attempt in range(1, attempts + 1):
            con = await self._acquire()
            try:
                await con.execute(sql)
            except BaseException as error:
                if not is_connection_lost(error):
                    await self._release(con)
                    raise
                # Never back to the pool: its protocol state is unknown, and
                # the pool's reset would not notice (it sends nothing when no
                # transaction is open).
                self._lost(con)
                if attempt == attempts:
                    raise
                continue
            return con
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[Connection]:
        """A connection as the login itself, for cross-tenant administration."""
        con = await self._acquire()
        try:
            yield con
        except BaseException as error:
            # As in a scope: a lost connection is not handed back for reuse.
            if is_connection_lost(error):
                _terminate(con)
            raise
        finally:
            await self._release(con)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._max.dec(self._size)
        await self.pool.close()


def _terminate(con: Pooled) -> None:
    # The pool detaches the proxy itself when it sees the connection close,
    # and a detached proxy refuses every call, terminate() included.
    with contextlib.suppress(asyncpg.InterfaceError):
        con.terminate()


async def _abandon(con: Pooled, error: BaseException) -> None:
    """End the transaction the block failed in, keeping `error` the one raised."""
    if is_connection_lost(error):
        _terminate(con)
        return
    try:
        await con.execute("ROLLBACK")
    except Exception:
        # Ending the backend rolls the transaction back too.
        _terminate(con)


async def _commit(con: Pooled, *, readonly: bool) -> None:
    try:
        await con.execute("COMMIT")
    except BaseException as error:
        if not is_connection_lost(error):
            # A serialization failure at COMMIT rolled back: retryable as is.
            raise
        _terminate(con)
        if readonly:
            # Nothing to commit: the reads stand, and a retry repeats nothing.
            raise
        raise CommitOutcomeUnknown(
            "the database connection was lost during COMMIT; the transaction "
            "may or may not have committed"
        ) from error


def record_dict(record: asyncpg.Record) -> dict[str, Any]:
    return dict(record.items())
