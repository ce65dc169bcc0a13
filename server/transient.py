"""Transient database errors: what they are, and the one way they are retried.

Two kinds, both worth trying again and neither a bug:

* the connection is lost (or cannot be had): a restart, failover, a killed
  backend, a server refusing connections for now;
* the transaction conflicted with a concurrent one: a deadlock victim or a
  serialization failure, rolled back by PostgreSQL.

A connection lost while COMMIT was in flight is a third case: the transaction
may or may not have committed (`CommitOutcomeUnknown`). Idempotent writers may
retry it; an API call may not, since it cannot know what it would repeat.

The retry policy is exponential backoff with jitter (tenacity): `retry` is
bounded, for API calls, and `retry_forever` is for the evaluator's loops, which
must outlive a database outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from pulse.device.v1.error_reason_pb2 import ErrorReason
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from server.errors import DOMAIN, reason_name, retry_info, unavailable_status
from server.observability import metrics

T = TypeVar("T")


class CommitOutcomeUnknown(Exception):
    """The connection was lost while COMMIT was in flight: it may have committed."""


CONNECTION_LOST: tuple[type[BaseException], ...] = (
    CommitOutcomeUnknown,
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # What asyncpg raises on a pooled connection whose backend was killed
    # while it sat idle: it read the FATAL message in no operation, so the
    # protocol is stuck consuming an error until the socket's end arrives,
    # and refuses the next query with this.
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
CONFLICT: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
TRANSIENT: tuple[type[BaseException], ...] = CONNECTION_LOST + CONFLICT

#: Attempts an API call gets in all, and its backoff: short, the caller waits.
ATTEMPTS = 3
_CALL_FIRST_S, _CALL_CAP_S = 0.05, 0.5
#: The evaluator's loops: from quick to at most a few seconds apart.
_LOOP_FIRST_S, _LOOP_CAP_S = 0.1, 5.0
#: What the RetryInfo detail of an answer suggests.
_UNAVAILABLE_DELAY_S, _CONFLICT_DELAY_S = 1.0, 0.1


def is_connection_lost(error: BaseException) -> bool:
    return isinstance(error, CONNECTION_LOST)


def is_conflict(error: BaseException) -> bool:
    return isinstance(error, CONFLICT)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT)


def is_safe_to_retry(error: BaseException) -> bool:
    """Transient, and certainly not committed."""
    return is_transient(error) and not isinstance(error, CommitOutcomeUnknown)


def retry_reason(error: BaseException) -> str:
    """The kind of a transient error, as the retry metric labels it."""
    if isinstance(error, CommitOutcomeUnknown):
        return "commit_outcome_unknown"
    if isinstance(error, asyncpg.DeadlockDetectedError):
        return "deadlock"
    if isinstance(error, asyncpg.SerializationError):
        return "serialization_failure"
    return "connection_lost"


def _count(error: BaseException) -> None:
    metrics.DB_RETRIES.labels(retry_reason(error)).inc()


def _policy(first_s: float, cap_s: float) -> wait_exponential_jitter:
    return wait_exponential_jitter(multiplier=first_s, max=cap_s, jitter=first_s)


async def retry(attempt: Callable[[], Awaitable[T]], *, budget_s: float | None = None) -> T:
    """`attempt()`, tried again on an error `is_safe_to_retry` up to ATTEMPTS
    times in all, and never sleeping past `budget_s` (a call's deadline)."""
    try:
        # The common case pays for nothing beyond the call itself.
        return await attempt()
    except Exception as error:
        if not is_safe_to_retry(error) or (budget_s is not None and budget_s <= _CALL_FIRST_S):
            raise
        _count(error)
    loop = asyncio.get_running_loop()
    started = loop.time()

    def stop(state: RetryCallState) -> bool:
        # The attempt above was the first.
        if state.attempt_number + 1 >= ATTEMPTS:
            return True
        elapsed = loop.time() - started
        return budget_s is not None and elapsed + state.upcoming_sleep >= budget_s

    def counted(state: RetryCallState) -> None:
        if state.outcome is not None and (error := state.outcome.exception()) is not None:
            _count(error)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_safe_to_retry),
        stop=stop,
        wait=_policy(_CALL_FIRST_S, _CALL_CAP_S),
        before_sleep=counted,
        reraise=True,
    )
    # Tenacity does not wait before its first try; this one follows a failure.
    await asyncio.sleep(_CALL_FIRST_S)
    async for trying in retrying:
        with trying:
            return await attempt()
    raise AssertionError("unreachable: tenacity either returns or reraises")


async def retry_forever(
    attempt: Callable[[], Awaitable[T]],
    *,
    log: logging.Logger,
    what: str,
    also: tuple[type[BaseException], ...] = (),
) -> T:
    """`attempt()` until it succeeds, backing off on transient errors (and on
    `also`, errors of something other than the database); anything else is
    raised."""
    retry_on = TRANSIENT + also

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if error is not None and is_transient(error):
            _count(error)
        log.warning("%s failed (%s); retrying in %.1fs", what, error, state.upcoming_sleep)

    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda error: isinstance(error, retry_on)),
        wait=_policy(_LOOP_FIRST_S, _LOOP_CAP_S),
        before_sleep=warn,
        reraise=True,
    )
    async for trying in retrying:
        with trying:
            return await attempt()
    raise AssertionError("unreachable: tenacity either returns or reraises")


def status(error: BaseException) -> status_pb2.Status:
    """The API's answer to a transient error: UNAVAILABLE or ABORTED, with
    ErrorInfo and a RetryInfo delay."""
    if isinstance(error, CommitOutcomeUnknown):
        answer = status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message="the database connection was lost while committing; the outcome is "
            "unknown: read the resource before retrying",
        )
        reason, delay_s = ErrorReason.OUTCOME_UNKNOWN, _UNAVAILABLE_DELAY_S
    elif is_conflict(error):
        answer = status_pb2.Status(
            code=code_pb2.ABORTED,
            message="the transaction conflicted with a concurrent one and was rolled back; retry",
        )
        reason, delay_s = ErrorReason.TRANSACTION_CONFLICT, _CONFLICT_DELAY_S
    else:
        answer = unavailable_status()
        reason, delay_s = ErrorReason.DATABASE_UNAVAILABLE, _UNAVAILABLE_DELAY_S
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason_name(reason), domain=DOMAIN))
    answer.details.extend([info, retry_info(delay_s)])
    return answer
