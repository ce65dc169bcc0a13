"""The connection pool and the tenant scope every tenant query runs in.

A tenant scope runs as the `pulse_app` role (which row-level security binds,
even when the login is a superuser) with `app.tenant_id` set, both in the
scope's first round trip, or already set:

* A write (and a snapshot read) is one transaction: BEGIN, then the role and
  the tenant set transaction-locally, so nothing outlives it. Three round
  trips for one statement: begin+scope, the statement, COMMIT.
* A read sets the role, the tenant and read-only transactions for the
  *session*, and each statement then runs in its own implicit transaction:
  two round trips, scope and statement, since nothing is left to commit.
  Under READ COMMITTED, which every scope uses, each statement of a
  transaction took a snapshot of its own anyway. On a connection whose
  session already carries that tenant's read scope, the scope is not sent
  again: one round trip.
* A write that is one statement (`Database.one_statement`) works the same
  way with a write scope for the session (read-only off): the statement
  commits by itself, one round trip where the scope is already there.

So a pooled connection may carry a session scope into its next checkout,
which is safe because every checkout either replaces it, drops it, or is of
that very tenant and kind: a read or one-statement write of another tenant
or kind sets all three again before its first statement; a transaction sets
its own role and tenant transaction-locally and asks for READ WRITE (or READ
ONLY), and its end restores the session's scope; anything else (`admin`,
`transaction` with another role) runs `_UNSCOPE` first on a connection that
was scoped. Only this module changes a pooled connection's session
settings, so `Database._scoped` knows each one's (`tests/infra/test_db.py`
checks every hand-over).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
import weakref
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


#: Drops a session scope.
_UNSCOPE = "RESET ROLE; RESET default_transaction_read_only; RESET app.tenant_id"

#: A session scope: the tenant, and whether it is read-only.
_Scope: TypeAlias = tuple[uuid.UUID, bool]


def _session_scope_sql(tenant_id: uuid.UUID, *, readonly: bool) -> str:
    # One simple-protocol message; the only value in it is a uuid.UUID
    # rendered by Python (32 hex digits and dashes).
    if not isinstance(tenant_id, uuid.UUID):
        raise TypeError("tenant_id must be a uuid.UUID")
    return (
        f"SET ROLE {APP_ROLE}; "
        f"SET default_transaction_read_only = {'on' if readonly else 'off'}; "
        f"SELECT set_config('app.tenant_id', '{tenant_id}', false)"
    )


def _begin_sql(tenant_id: uuid.UUID, *, readonly: bool, snapshot: bool = False) -> str:
    # One simple-protocol message instead of three round trips. The values in
    # it are a uuid.UUID rendered by Python (32 hex digits and dashes) and,
    # in a traced write, a traceparent that `tracing.traceparent` checked is
    # hex digits and dashes: nothing that can close the literal.
    if not isinstance(tenant_id, uuid.UUID):
        raise TypeError("tenant_id must be a uuid.UUID")
    # READ WRITE spelled out: a read's session scope makes READ ONLY the default.
    mode = (" ISOLATION LEVEL REPEATABLE READ" if snapshot else "") + (
        " READ ONLY" if readonly else " READ WRITE"
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
        #: Connections left with a session scope, and which: its tenant and
        #: whether it is read-only; None while a scope script may have run
        #: only in part.
        self._scoped: weakref.WeakKeyDictionary[Any, _Scope | None] = weakref.WeakKeyDictionary()

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
        """A scope in which only `tenant_id`'s rows exist: a transaction, or
        with `readonly` a read whose statements each see the latest commits
        (READ COMMITTED's view in a transaction too). With `snapshot`, every
        statement sees the database as of when the scope began (REPEATABLE
        READ, the snapshot taken by the BEGIN script itself)."""
        if readonly and not snapshot:
            return self._read(tenant_id)
        return self._transaction(
            _begin_sql(tenant_id, readonly=readonly, snapshot=snapshot),
            readonly=readonly,
            unscope=False,
        )

    @asynccontextmanager
    async def _read(self, tenant_id: uuid.UUID) -> AsyncIterator[Connection]:
        con = await self._begin((tenant_id, True))
        async with self._lent(con):
            yield con

    def one_statement(
        self, tenant_id: uuid.UUID
    ) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A write scope for a write that is one statement, which commits by
        itself (a statement after it, such as a read explaining why it
        changed nothing, runs and commits on its own).

        Raises CommitOutcomeUnknown when the connection is lost during the
        block: the statement may or may not have committed. A traced write
        is a transaction, whose outbox rows keep its trace."""
        if tracing.traceparent() is not None:
            return self.tenant(tenant_id)
        return self._one_statement(tenant_id)

    @asynccontextmanager
    async def _one_statement(self, tenant_id: uuid.UUID) -> AsyncIterator[Connection]:
        con = await self._begin((tenant_id, False))
        try:
            async with self._lent(con):
                yield con
        except BaseException as error:
            if not is_connection_lost(error):
                raise
            raise CommitOutcomeUnknown(
                "the database connection was lost during a write; it may or may not have committed"
            ) from error

    def transaction(
        self, begin: str, *, readonly: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A transaction opened by `begin`, one simple-protocol script starting
        with BEGIN, and committed when the block ends.

        Raises CommitOutcomeUnknown when the connection is lost during the
        COMMIT of a read-write transaction.
        """
        return self._transaction(begin, readonly=readonly, unscope=True)

    @asynccontextmanager
    async def _transaction(
        self, begin: str, *, readonly: bool, unscope: bool
    ) -> AsyncIterator[Connection]:
        con = await self._begin(begin, unscope=unscope)
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

    async def _begin(self, begin: str | _Scope, *, unscope: bool = False) -> Pooled:
        """A connection on which the `begin` script ran, or whose session has
        the `begin` scope; with `unscope`, a session scope was dropped first."""
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
                if unscope:
                    await self._unscope(con)
                if isinstance(begin, str):
                    await con.execute(begin)
                else:
                    await self._scope(con, begin)
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
        async with self._lent(con):
            await self._unscope(con)
            yield con

    @asynccontextmanager
    async def _lent(self, con: Pooled) -> AsyncIterator[None]:
        """Back to the pool at the end, unless it was lost meanwhile: then
        it is ended, never handed out again."""
        try:
            yield
        except BaseException as error:
            if is_connection_lost(error):
                _terminate(con)
            raise
        finally:
            await self._release(con)

    async def _scope(self, con: Pooled, scope: _Scope) -> None:
        """Give `con`'s session `scope`, unless it has it already."""
        raw = _raw(con)
        if self._scoped.get(raw) == scope:
            return
        # Marked before it runs: a script that fails half-way leaves nothing,
        # but the mark only costs an _UNSCOPE.
        self._scoped[raw] = None
        tenant_id, readonly = scope
        await con.execute(_session_scope_sql(tenant_id, readonly=readonly))
        self._scoped[raw] = scope

    async def _unscope(self, con: Pooled) -> None:
        raw = _raw(con)
        if raw in self._scoped:
            await con.execute(_UNSCOPE)
            del self._scoped[raw]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._max.dec(self._size)
        await self.pool.close()


def _raw(con: Pooled) -> Any:
    """The connection behind a pool's proxy, which lives as long as it does."""
    return con._con  # type: ignore[attr-defined]


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
