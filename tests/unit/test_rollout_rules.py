"""The rollout rules (server/rollouts/rules.py): when a patch holds, a
written device's outcome, the rate, the abort rule."""

from __future__ import annotations

import bisect
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from server.rollouts import rules
from server.twin.merge_patch import apply_merge_patch

_keys = st.sampled_from(["a", "b", "c", "fw", "mode"])
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([1.0, 2.5]), st.text(max_size=3)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=10,
)
_documents = st.dictionaries(_keys, _values, max_size=4)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@given(_documents, _documents)
def test_a_patch_holds_once_applied(document: dict[str, Any], patch: dict[str, Any]) -> None:
    assert rules.patch_holds(apply_merge_patch(document, patch), patch)


@given(_documents, _documents)
def test_a_patch_holds_exactly_when_applying_it_changes_nothing(
    document: dict[str, Any], patch: dict[str, Any]
) -> None:
    from server.twin.delta import values_equal

    unchanged = values_equal(apply_merge_patch(document, patch), document)
    assert rules.patch_holds(document, patch) == unchanged


def test_patch_holds_compares_numbers_by_value_and_keeps_booleans_apart() -> None:
    assert rules.patch_holds({"n": 1.0}, {"n": 1})
    assert not rules.patch_holds({"n": True}, {"n": 1})
    assert not rules.patch_holds({"gone": None}, {"gone": None})
    assert rules.patch_holds({}, {"gone": None})
    assert not rules.patch_holds({"fw": "2"}, {"fw": {"target": "2"}})


def _twin(
    reported: dict[str, Any], version: int, *, desired: dict[str, Any] | None = None
) -> rules.Twin:
    return rules.Twin(
        active=True,
        desired={"fw": "2"} if desired is None else desired,
        reported=reported,
        reported_version=version,
    )


def _outcome(twin: rules.Twin | None, *, now: datetime = T0) -> tuple[str, str] | None:
    return rules.outcome(
        twin,
        patch={"fw": "2"},
        written_version=3,
        failure_path=("fw_error",),
        deadline=T0 + timedelta(minutes=1),
        now=now,
    )


def test_a_device_succeeds_only_once_it_acknowledged_the_write() -> None:
    # Reporting the values under an older version is not applying the write.
    assert _outcome(_twin({"fw": "2"}, 2)) is None
    assert _outcome(_twin({"fw": "2"}, 3)) == (rules.SUCCEEDED, "acknowledged desired version 3")
    assert _outcome(_twin({"fw": "2", "x": 1}, 4)) == (
        rules.SUCCEEDED,
        "acknowledged desired version 4",
    )
    assert _outcome(_twin({"fw": "1"}, 3)) is None


def test_a_reported_error_fails_the_device_even_with_the_patch_applied() -> None:
    state, detail = _outcome(_twin({"fw": "2", "fw_error": {"code": 7}}, 3)) or ("", "")
    assert state == rules.FAILED and detail.startswith("reported ")
    assert _outcome(_twin({"fw": "2", "fw_error": None}, 3)) == (
        rules.SUCCEEDED,
        "acknowledged desired version 3",
    )


def test_a_desired_state_that_no_longer_holds_the_patch_is_superseded() -> None:
    assert _outcome(_twin({}, 0, desired={"fw": "3"})) == (
        rules.SUPERSEDED,
        "the desired state was changed after the write",
    )
    # Changed elsewhere, the patch still holding: the rollout still waits.
    assert _outcome(_twin({}, 0, desired={"fw": "2", "led": "on"})) is None


def test_past_the_deadline_a_device_times_out_and_gone_ones_are_skipped() -> None:
    late = T0 + timedelta(minutes=1)
    assert _outcome(_twin({}, 2), now=late) == (
        rules.TIMED_OUT,
        "last acknowledged desired version 2, not 3",
    )
    assert _outcome(None) == (rules.SKIPPED, "the device was deleted after the write")
    gone = rules.Twin(active=False, desired={}, reported={}, reported_version=0)
    assert _outcome(gone) == (rules.SKIPPED, "the device was decommissioned after the write")


@given(
    st.integers(1, 6_000),
    st.lists(st.floats(0, 600, allow_nan=False), min_size=1, max_size=20),
)
def test_the_budget_never_lets_a_minute_start_more_than_the_rate(
    per_minute: int, times: list[float]
) -> None:
    """However the engine's ticks fall, starting its whole budget at each."""
    started: list[float] = []
    forfeited = 0
    for t in sorted(times):
        budget = rules.start_budget(
            max_per_minute=per_minute,
            since=T0,
            started_since=len(started) + forfeited,
            now=T0 + timedelta(seconds=t),
        )
        assert budget.starts is not None and budget.starts >= 0
        started += [t] * budget.starts
        forfeited += budget.forfeited
    # The busiest minute starts at a start.
    busiest = max(
        (bisect.bisect_left(started, t + 60) - i for i, t in enumerate(started)), default=0
    )
    assert busiest <= per_minute + rules.burst(per_minute)


def test_the_budget_follows_the_rate_and_zero_means_no_limit() -> None:
    at = T0 + timedelta(seconds=30)
    assert rules.start_budget(max_per_minute=0, since=T0, started_since=9, now=at).starts is None
    # 31 allowed by now; at most two seconds' worth at once, the rest forfeited.
    assert rules.start_budget(max_per_minute=60, since=T0, started_since=0, now=at) == rules.Budget(
        2, 29
    )
    assert rules.start_budget(
        max_per_minute=60, since=T0, started_since=30, now=at
    ) == rules.Budget(1, 0)
    assert rules.start_budget(
        max_per_minute=60, since=T0, started_since=31, now=at
    ) == rules.Budget(0, 0)
    assert rules.next_start_at(max_per_minute=60, since=T0, started_since=31) == T0 + timedelta(
        seconds=31
    )


def test_a_fast_rate_ticks_for_a_quarter_second_of_starts_a_slow_one_for_each() -> None:
    # 6,000 a minute: 25 starts a quarter second; the 26th to 50th are due
    # at 0.49 s, when the 50th is.
    assert rules.next_tick_at(max_per_minute=6000, since=T0, started_since=25) == T0 + timedelta(
        seconds=0.49
    )
    slow = rules.next_start_at(max_per_minute=60, since=T0, started_since=31)
    assert rules.next_tick_at(max_per_minute=60, since=T0, started_since=31) == slow


def test_the_abort_rule_needs_its_minimum_and_a_share_above_the_threshold() -> None:
    def reason(**counts: int) -> str | None:
        return rules.abort_reason(rules.Counts(**counts), threshold_percent=10, min_count=10)

    assert reason(succeeded=8, failed=1) is None  # 9 outcomes: too few
    assert reason(succeeded=9, failed=1) is None  # 10%: not above
    assert reason(succeeded=8, failed=1, timed_out=1) == (
        "2 of 10 devices with an outcome failed or timed out (20.0%, above the threshold of 10%)"
    )
    assert rules.abort_reason(rules.Counts(failed=5), threshold_percent=None, min_count=1) is None
    assert rules.abort_reason(rules.Counts(failed=1), threshold_percent=0, min_count=1)
