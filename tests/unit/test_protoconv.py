"""Well-known type conversions agree with protobuf's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from server.protoconv import timestamp

_FIRST, _LAST = datetime(1, 1, 2), datetime(9999, 12, 30)
_ZONES: st.SearchStrategy[tzinfo] = st.one_of(
    st.just(UTC), st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
)


def _protobufs(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


@given(st.datetimes(_FIRST, _LAST, timezones=_ZONES))
def test_timestamp_is_protobufs_from_datetime(value: datetime) -> None:
    assert timestamp(value) == _protobufs(value)


@given(st.datetimes(_FIRST, _LAST))
def test_a_naive_time_is_utc_as_for_protobuf(value: datetime) -> None:
    assert timestamp(value) == _protobufs(value)


def test_no_time_is_no_timestamp() -> None:
    assert timestamp(None) is None
