"""The rules of a rollout, pure: when a patch holds, what a device's outcome
is, how many devices may start now, and when a rollout aborts
(docs/rollouts.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from server.twin.delta import values_equal

PENDING = "PENDING"
APPLIED = "APPLIED"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
TIMED_OUT = "TIMED_OUT"
SKIPPED = "SKIPPED"
SUPERSEDED = "SUPERSEDED"
DEVICE_STATES = (PENDING, APPLIED, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED, SUPERSEDED)

RUNNING = "RUNNING"
PAUSED = "PAUSED"
DONE = "SUCCEEDED"
ABORTED = "ABORTED"
CANCELLED = "CANCELLED"
ENDED = frozenset({DONE, ABORTED, CANCELLED})

DETAIL_MAX = 256


def patch_holds(document: Any, patch: dict[str, Any]) -> bool:
    """Whether applying the merge patch to `document` would change nothing:
    every key it sets has that value (numbers by value, as twin deltas
    compare them), every key it deletes (null) is absent."""
    if type(document) is not dict:
        return False
    for key, value in patch.items():
        if value is None:
            if key in document:
                return False
        elif type(value) is dict:
            if not patch_holds(document.get(key), value):
                return False
        elif key not in document or not values_equal(document[key], value):
            return False
    return True


_ABSENT = object()


def value_at(document: Any, keys: Sequence[str]) -> Any:
    """The value at the path, or None when there is none."""
    for key in keys:
        if type(document) is not dict:
            return None
        document = document.get(key, _ABSENT)
        if document is _ABSENT:
            return None
    return document


@dataclass(frozen=True, slots=True)
class Twin:
    """What the outcome of an APPLIED device is judged on."""

    active: bool
    desired: dict[str, Any]
    reported: dict[str, Any]
    reported_version: int


def outcome(
    twin: Twin | None,
    *,
    patch: dict[str, Any],
    written_version: int,
    failure_path: Sequence[str],
    deadline: datetime,
    now: datetime,
    describe: Any = repr,
) -> tuple[str, str] | None:
    """The (state, detail) an APPLIED device moves to, or None while it has none.

    In order: gone (deleted or decommissioned) is SKIPPED; a device that
    acknowledged the write (or a later one) FAILED if it reports a value at
    the failure path, SUCCEEDED if its report holds the patch; a desired
    document that no longer holds the patch was changed by someone else,
    SUPERSEDED; past the deadline, TIMED_OUT.
    """
    if twin is None:
        return SKIPPED, "the device was deleted after the write"
    if not twin.active:
        return SKIPPED, "the device was decommissioned after the write"
    if twin.reported_version >= written_version:
        if failure_path:
            error = value_at(twin.reported, failure_path)
            if error is not None:
                return FAILED, _clip(f"reported {describe(error)}")
        if patch_holds(twin.reported, patch):
            return SUCCEEDED, f"acknowledged desired version {twin.reported_version}"
    if not patch_holds(twin.desired, patch):
        return SUPERSEDED, "the desired state was changed after the write"
    if now >= deadline:
        return TIMED_OUT, _timed_out_detail(twin, written_version)
    return None


def _timed_out_detail(twin: Twin, written_version: int) -> str:
    if twin.reported_version < written_version:
        return f"last acknowledged desired version {twin.reported_version}, not {written_version}"
    return "acknowledged the write but does not report the patch applied"


def _clip(text: str) -> str:
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


#: Starts the rate lets pile up while no engine started any (a slow tick, a
#: restart): this many seconds' worth, so that an engine ticking late still
#: keeps the rate, and a long gap never turns into a burst.
BURST_S = 2.0


def burst(max_per_minute: int) -> int:
    return max(1, math.ceil(max_per_minute * BURST_S / 60.0))


@dataclass(frozen=True, slots=True)
class Budget:
    #: How many devices may start now; None: no limit.
    starts: int | None
    #: Starts the rate allowed but nobody made, past the burst: counted as
    #: made, so that they are never made up for later.
    forfeited: int = 0


def start_budget(
    *, max_per_minute: int, since: datetime, started_since: int, now: datetime
) -> Budget:
    """How many more devices may start now. The rate is counted from
    `since` (the start, or the last resume): one at once, then one every
    60/max_per_minute seconds, never more than `burst` at a time. So any
    minute starts at most max_per_minute + burst(max_per_minute)."""
    if max_per_minute == 0:
        return Budget(None)
    elapsed = max((now - since).total_seconds(), 0.0)
    allowed = 1 + math.floor(elapsed * max_per_minute / 60.0)
    available = max(allowed - started_since, 0)
    cap = burst(max_per_minute)
    return Budget(min(available, cap), max(available - cap, 0))


def next_start_at(*, max_per_minute: int, since: datetime, started_since: int) -> datetime:
    """When the rate next allows a start."""
    return since + timedelta(seconds=started_since * 60.0 / max_per_minute)


#: A rate-limited rollout waits for this many seconds' worth of starts (at
#: least one) between ticks: at 6,000 a minute, four ticks a second of 25
#: devices each rather than a hundred of one, each a transaction.
TICK_S = 0.25


def next_tick_at(*, max_per_minute: int, since: datetime, started_since: int) -> datetime:
    """When the rate next allows a tick's worth of starts."""
    worth = max(1, math.floor(max_per_minute * TICK_S / 60.0))
    return next_start_at(
        max_per_minute=max_per_minute, since=since, started_since=started_since + worth - 1
    )


@dataclass(frozen=True, slots=True)
class Counts:
    pending: int = 0
    applied: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    skipped: int = 0
    superseded: int = 0


def abort_reason(counts: Counts, *, threshold_percent: float | None, min_count: int) -> str | None:
    """Why the abort rule ends the rollout, or None."""
    if threshold_percent is None:
        return None
    bad = counts.failed + counts.timed_out
    finished = bad + counts.succeeded
    if finished < max(min_count, 1) or bad * 100 <= threshold_percent * finished:
        return None
    return (
        f"{bad} of {finished} devices with an outcome failed or timed out "
        f"({bad * 100 / finished:.1f}%, above the threshold of {threshold_percent:g}%)"
    )


def finished_reason(counts: Counts) -> str:
    """Why a snapshot rollout is SUCCEEDED: what became of its devices."""
    parts = [
        f"{n} {name.replace('_', ' ')}"
        for name, n in (
            ("succeeded", counts.succeeded),
            ("failed", counts.failed),
            ("timed_out", counts.timed_out),
            ("skipped", counts.skipped),
            ("superseded", counts.superseded),
        )
        if n
    ]
    if not parts:
        return "the target had no devices"
    return "every device has an outcome: " + ", ".join(parts)
