"""The liveness planner (evaluator/liveness.py), against a model of the
statement that applies signals (server/connectivity/transitions.py): however
a device's signals are reduced, the result is what applying every one of
them in turn would have left."""

from __future__ import annotations

import enum
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from evaluator.liveness import changes_status, net_signals, plan_rounds
from server.connectivity.model import Signal
from server.connectivity.transitions import DeviceSignal

TENANT = uuid.UUID(int=1)
T0 = datetime(2024, 1, 1, tzinfo=UTC)
STATUSES = ("UNKNOWN", "ONLINE", "OFFLINE", "STALE")


@dataclass(frozen=True)
class Row:
    """The device_state columns the statement reads and writes."""

    status: str = "UNKNOWN"
    last_seen: datetime | None = None
    liveness_seq: int | None = None
    session_seq: int | None = None


def _decides(row: Row, signal: DeviceSignal) -> bool:
    seq = signal.seq
    if seq is None:
        return True
    if signal.signal is Signal.WILL:
        return row.session_seq is None or seq >= row.session_seq
    newer = row.liveness_seq is None or seq > row.liveness_seq
    if signal.signal is Signal.ACTIVITY:
        return newer and row.status in ("UNKNOWN", "STALE")
    return newer


def apply_one(row: Row, signal: DeviceSignal) -> Row:
    """One signal, as _APPLY_SIGNALS applies it."""
    decides = _decides(row, signal)
    status = row.status
    if decides:
        status = "OFFLINE" if signal.signal in (Signal.OFFLINE, Signal.WILL) else "ONLINE"
    times = [t for t in (row.last_seen, signal.seen) if t is not None]
    if signal.signal is not Signal.WILL:
        times.append(signal.at)
    ordered = decides and signal.seq is not None and signal.signal is not Signal.ACTIVITY
    liveness_seq, session_seq = row.liveness_seq, row.session_seq
    if ordered:
        assert signal.seq is not None
        liveness_seq = max(signal.seq, liveness_seq if liveness_seq is not None else -1)
        if signal.signal is Signal.ONLINE:
            session_seq = signal.seq
    return Row(status, max(times, default=None), liveness_seq, session_seq)


def apply_all(row: Row, signals: list[DeviceSignal]) -> Row:
    for signal in signals:
        row = apply_one(row, signal)
    return row


class Mode(enum.Enum):
    """How a device numbers its messages."""

    WITH_SEQ = "every one"
    WITHOUT_SEQ = "none"
    ACTIVITY_SEQ = "only activity (twin reports with seq, plain status messages)"
    MIXED = "some"

    def seq(self, signal: Signal, seq: int, numbered: bool) -> int | None:
        if self is Mode.WITH_SEQ:
            return seq
        if self is Mode.WITHOUT_SEQ:
            return None
        if self is Mode.ACTIVITY_SEQ and signal is not Signal.ACTIVITY:
            return None
        return seq if numbered else None


# (signal, seq if numbered, numbered, seconds since the one before)
_ITEMS = st.lists(
    st.tuples(st.sampled_from(list(Signal)), st.integers(0, 15), st.booleans(), st.integers(0, 2)),
    max_size=12,
)


def _signals(mode: Mode, items: list[tuple[Signal, int, bool, int]]) -> list[DeviceSignal]:
    """One device's signals in arrival order; receipt times never go back."""
    out, at = [], T0
    for signal, seq, numbered, step in items:
        at += timedelta(seconds=step)
        out.append(DeviceSignal(TENANT, "D", signal, at, mode.seq(signal, seq, numbered)))
    return out


def sweep(row: Row) -> Row:
    return replace(row, status="STALE") if row.status == "ONLINE" else row


def _case(
    mode: Mode, history: list[tuple[Signal, int, bool, int]], swept: bool, *runs: list[Any]
) -> tuple[Row, list[list[DeviceSignal]]]:
    """A state the statements can leave (signals numbered like `mode`, then
    maybe a sweep), and runs of the device's signals numbered alike."""
    row = apply_all(Row(), _signals(mode, history))
    return (sweep(row) if swept else row), [_signals(mode, items) for items in runs]


def runs(
    count: int, modes: Sequence[Mode] = (Mode.WITH_SEQ, Mode.WITHOUT_SEQ, Mode.ACTIVITY_SEQ)
) -> st.SearchStrategy[tuple[Row, list[list[DeviceSignal]]]]:
    return st.builds(
        _case, st.sampled_from(modes), _ITEMS, st.booleans(), *[_ITEMS for _ in range(count)]
    )


@settings(max_examples=300)
@given(runs(1))
def test_the_net_effect_is_applying_every_signal_in_turn(
    case: tuple[Row, list[list[DeviceSignal]]],
) -> None:
    row, [signals] = case
    net = net_signals(signals)
    assert len(net.signals) <= 2
    want, got = apply_all(row, signals), apply_all(row, net.signals)
    assert (got.status, got.last_seen, got.liveness_seq) == (
        want.status,
        want.last_seen,
        want.liveness_seq,
    )


@settings(max_examples=200)
@given(runs(2))
def test_what_comes_later_finds_the_same_state(
    case: tuple[Row, list[list[DeviceSignal]]],
) -> None:
    """session_seq may stay lower than in-turn application would leave it
    (an online folded under a newer offline), which no later signal can
    tell apart: a will it lets through finds the device OFFLINE already."""
    row, [signals, later] = case
    want = apply_all(apply_all(row, signals), later)
    got = apply_all(apply_all(row, net_signals(signals).signals), later)
    assert (got.status, got.last_seen, got.liveness_seq) == (
        want.status,
        want.last_seen,
        want.liveness_seq,
    )


@settings(max_examples=200)
@given(runs(2))
def test_reducing_what_was_reduced_before_changes_nothing(
    case: tuple[Row, list[list[DeviceSignal]]],
) -> None:
    """A held device's signals are reduced at every flush, with new ones
    appended: the result must be the same as reducing everything at once."""
    row, [first, second] = case
    again = net_signals(net_signals(first).signals + second).signals
    assert len(again) <= 2
    want = apply_all(row, first + second)
    got = apply_all(row, again)
    assert (got.status, got.last_seen, got.liveness_seq) == (
        want.status,
        want.last_seen,
        want.liveness_seq,
    )


@settings(max_examples=200)
@given(runs(1, [Mode.MIXED]))
def test_a_device_mixing_both_gets_at_most_two_signals(
    case: tuple[Row, list[list[DeviceSignal]]],
) -> None:
    """Status messages with seq beside messages without: the last without
    seq and the newest with seq are kept, in arrival order. Exact but when a
    will with seq is left out: with a status decided by a message without
    seq in between, an older will may still apply where the newest status
    message is refused (docs/device-ordering.md)."""
    row, [signals] = case
    net = net_signals(signals).signals
    assert len(net) <= 2
    # Counted, not compared as a set: a will redelivered (same seq, same
    # time) after a message without seq is left out as well.
    kept: Counter[tuple[Signal, int | None, datetime]] = Counter(
        (s.signal, s.seq, s.at) for s in net
    )
    wills: Counter[tuple[Signal, int | None, datetime]] = Counter(
        (s.signal, s.seq, s.at) for s in signals if s.signal is Signal.WILL and s.seq is not None
    )
    if not wills - kept:
        want, got = apply_all(row, signals), apply_all(row, net)
        assert (got.status, got.last_seen) == (want.status, want.last_seen)


@given(runs(1, [Mode.WITH_SEQ]))
def test_with_seq_the_newest_status_signal_decides(
    case: tuple[Row, list[list[DeviceSignal]]],
) -> None:
    _, [signals] = case
    statuses = [s for s in signals if s.signal is not Signal.ACTIVITY]
    net = net_signals(signals).signals
    if statuses:
        newest = max(statuses, key=lambda s: (s.seq, s.signal is Signal.WILL))
        assert replace(net[0], seen=None).signal is newest.signal
        assert net[0].seq == newest.seq
    # Order, not arrival, decides: any shuffle has the same net status signal.
    assert net_signals(list(reversed(signals))).signals[:1] == [] or (
        net_signals(list(reversed(signals))).signals[0].seq == (net[0].seq if net else None)
    )


def _alternating(count: int) -> list[DeviceSignal]:
    return [
        DeviceSignal(
            TENANT,
            "D",
            Signal.ONLINE if n % 2 == 0 else Signal.OFFLINE,
            T0 + timedelta(milliseconds=n),
        )
        for n in range(count)
    ]


def test_a_flood_of_flaps_is_one_signal_and_counted() -> None:
    net = net_signals(_alternating(500))
    assert [s.signal for s in net.signals] == [Signal.OFFLINE]
    assert net.folded == 499
    assert net.out_of_order == 0


def test_out_of_order_status_signals_are_counted_and_lose() -> None:
    def s(signal: Signal, seq: int) -> DeviceSignal:
        return DeviceSignal(TENANT, "D", signal, T0, seq)

    net = net_signals([s(Signal.OFFLINE, 2), s(Signal.ONLINE, 1), s(Signal.WILL, 1)])
    assert [(x.signal, x.seq) for x in net.signals] == [(Signal.OFFLINE, 2)]
    # The online is older than the offline; the will's session (1) was
    # not superseded by a newer online, so it is not out of order.
    assert net.out_of_order == 1


def test_rounds_keep_each_devices_net_effect_in_order() -> None:
    def s(device: str, signal: Signal, seconds: int) -> DeviceSignal:
        return DeviceSignal(TENANT, device, signal, T0 + timedelta(seconds=seconds))

    rounds = plan_rounds(
        [
            s("A", Signal.ACTIVITY, 1),
            s("B", Signal.ONLINE, 1),
            s("A", Signal.OFFLINE, 4),
            s("B", Signal.ACTIVITY, 5),
            s("A", Signal.ACTIVITY, 7),
            s("C", Signal.WILL, 8),
        ]
    )
    assert rounds == [
        [
            s("A", Signal.OFFLINE, 4),
            replace(s("B", Signal.ONLINE, 1), seen=T0 + timedelta(seconds=5)),
            s("C", Signal.WILL, 8),
        ],
        [s("A", Signal.ACTIVITY, 7)],
    ]


def test_a_device_is_held_only_when_its_status_would_change() -> None:
    def s(signal: Signal, seq: int | None = None) -> DeviceSignal:
        return DeviceSignal(TENANT, "D", signal, T0, seq)

    assert not changes_status("ONLINE", [s(Signal.ACTIVITY), s(Signal.ONLINE)])
    assert changes_status("ONLINE", [s(Signal.OFFLINE)])
    assert changes_status("OFFLINE", [s(Signal.ACTIVITY)])
    # With seq, activity does not end OFFLINE; it does revive STALE.
    assert not changes_status("OFFLINE", [s(Signal.ACTIVITY, 3)])
    assert changes_status("STALE", [s(Signal.ACTIVITY, 3)])
