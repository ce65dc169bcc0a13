"""The typed DeviceFilter builders (pulse_client._filters): pure unit tests.

Lines marked ``# type: ignore[...]`` are also static checks: mypy runs with
``warn_unused_ignores``, so it fails if it ever starts accepting them.
"""

from __future__ import annotations

import math
import operator
import typing
from datetime import UTC, datetime, timedelta, timezone

import pulse_client as pc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st
from pulse.device.v1 import filter_pb2, status_pb2, twin_pb2
from pulse_client import _filters, desired, key, reported, version_range, where
from pulse_client._groups import device_filter

from server.filters import MAX_TWIN_PATH_SEGMENTS, join_twin_path, parse_filter, split_twin_path

TC = filter_pb2.TwinCondition
Op = filter_pb2.TwinCondition.Operator
Doc = filter_pb2.TwinCondition.Document


def s(text: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=text)


def n(number: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=number)


def cond(
    document: filter_pb2.TwinCondition.Document.ValueType,
    path: str,
    operator: filter_pb2.TwinCondition.Operator.ValueType,
    *values: struct_pb2.Value,
) -> filter_pb2.TwinCondition:
    return TC(document=document, path=path, operator=operator, values=values)


# --- conditions equal hand-built messages ---------------------------------


def test_orderings() -> None:
    r = reported("fw.version")
    assert (r < "2.4") == cond(Doc.REPORTED, "fw.version", Op.LESS, s("2.4"))
    assert (r <= 3) == cond(Doc.REPORTED, "fw.version", Op.LESS_OR_EQUAL, n(3))
    assert (r > 2.5) == cond(Doc.REPORTED, "fw.version", Op.GREATER, n(2.5))
    assert (r >= -1) == cond(Doc.REPORTED, "fw.version", Op.GREATER_OR_EQUAL, n(-1))


def test_reflected_orderings_keep_their_meaning() -> None:
    # 40 <= t: int.__le__ declines, so Python asks t.__ge__(40).
    t = reported("temp")
    assert operator.le(40, t) == cond(Doc.REPORTED, "temp", Op.GREATER_OR_EQUAL, n(40))
    assert operator.lt(40, t) == cond(Doc.REPORTED, "temp", Op.GREATER, n(40))
    assert operator.gt("b", t) == cond(Doc.REPORTED, "temp", Op.LESS, s("b"))
    assert operator.ge("b", t) == cond(Doc.REPORTED, "temp", Op.LESS_OR_EQUAL, s("b"))


def test_equality_methods() -> None:
    d = desired("mode")
    assert d.eq("eco") == cond(Doc.DESIRED, "mode", Op.EQUALS, s("eco"))
    assert d.ne("eco") == cond(Doc.DESIRED, "mode", Op.NOT_EQUALS, s("eco"))
    assert d.eq(7) == cond(Doc.DESIRED, "mode", Op.EQUALS, n(7))
    assert d.eq(0.5) == cond(Doc.DESIRED, "mode", Op.EQUALS, n(0.5))
    assert d.eq(True) == cond(Doc.DESIRED, "mode", Op.EQUALS, struct_pb2.Value(bool_value=True))
    assert d.ne(None) == cond(
        Doc.DESIRED, "mode", Op.NOT_EQUALS, struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    )


def test_bool_is_a_bool_not_a_number() -> None:
    (value,) = reported("on").eq(True).values
    assert value.WhichOneof("kind") == "bool_value"
    (value,) = reported("on").eq(1).values
    assert value.WhichOneof("kind") == "number_value"


def test_is_in_keeps_order_and_types() -> None:
    got = reported("region").is_in("eu", "us", 3, False, None)
    assert got == cond(
        Doc.REPORTED,
        "region",
        Op.IN,
        s("eu"),
        s("us"),
        n(3),
        struct_pb2.Value(bool_value=False),
        struct_pb2.Value(null_value=struct_pb2.NULL_VALUE),
    )
    assert reported("region").is_in("eu") == cond(Doc.REPORTED, "region", Op.IN, s("eu"))


def test_exists_and_missing() -> None:
    assert desired("fw.target").exists() == cond(Doc.DESIRED, "fw.target", Op.EXISTS)
    assert reported("fw.target").missing() == cond(Doc.REPORTED, "fw.target", Op.DOES_NOT_EXIST)


def test_twin_path_is_a_value() -> None:
    assert reported("a") == pc.TwinPath(Doc.REPORTED, "a")
    assert reported("a") != desired("a")
    assert len({reported("a"), reported("a"), desired("a")}) == 2
    assert repr(reported("a.b")) == "reported('a.b')"
    assert repr(desired(key("x.y"))) == "desired('x\\\\.y')"


# --- paths and escaping -----------------------------------------------------


def test_path_strings_are_used_as_is() -> None:
    assert reported("fw.version").path == "fw.version"
    assert reported("a\\.b").exists().path == "a\\.b"


@pytest.mark.parametrize(
    ("segments", "path"),
    [
        (("fw",), "fw"),
        (("fw", "version"), "fw.version"),
        (("wlan.0",), "wlan\\.0"),
        (("net", "wlan.0", "ip"), "net.wlan\\.0.ip"),
        (("C:\\temp",), "C:\\\\temp"),
        (("\\.",), "\\\\\\."),
        (("..",), "\\.\\."),
        (("a\\", "b"), "a\\\\.b"),
    ],
)
def test_key_escapes(segments: tuple[str, ...], path: str) -> None:
    assert key(*segments) == path
    assert split_twin_path(path) == segments


@given(st.lists(st.text(min_size=1), min_size=1, max_size=MAX_TWIN_PATH_SEGMENTS))
def test_key_round_trips_through_the_server_parser(segments: list[str]) -> None:
    path = key(*segments)
    assert path == join_twin_path(segments)
    assert split_twin_path(path) == tuple(segments)
    assert reported(path).exists().path == path


def test_bad_keys_and_paths() -> None:
    with pytest.raises(ValueError, match="empty key at 1"):
        key("a", "")
    with pytest.raises(TypeError):
        key("a", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        key()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="must not be empty"):
        reported("")
    with pytest.raises(TypeError):
        desired(["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DESIRED or REPORTED"):
        pc.TwinPath(Doc.DOCUMENT_UNSPECIFIED, "a")


# --- values refused ---------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_orderings_refuse_bools(value: bool) -> None:
    # mypy cannot tell bool from int here; the runtime does.
    r = reported("x")
    for compare in (r.__lt__, r.__le__, r.__gt__, r.__ge__):
        with pytest.raises(TypeError, match="number or a string, not bool"):
            compare(value)
    with pytest.raises(TypeError):
        _ = value < r


def test_orderings_refuse_other_types() -> None:
    r = reported("x")
    with pytest.raises(TypeError, match="not dict"):
        _ = r < {"a": 1}  # type: ignore[operator]
    with pytest.raises(TypeError, match="not NoneType"):
        _ = r >= None  # type: ignore[operator]
    with pytest.raises(TypeError, match="not list"):
        _ = r > [1]  # type: ignore[operator]
    with pytest.raises(TypeError, match="not bytes"):
        _ = r <= b"1"  # type: ignore[operator]


def test_equality_methods_refuse_containers() -> None:
    r = reported("x")
    with pytest.raises(TypeError, match="eq\\(\\) compares"):
        r.eq({"a": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ne\\(\\) compares"):
        r.ne([1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is_in\\(\\) compares"):
        r.is_in("a", ("b",))  # type: ignore[arg-type]


def test_is_in_needs_a_value() -> None:
    with pytest.raises(TypeError):
        reported("x").is_in()  # type: ignore[call-arg]
    nothing: list[str] = []
    with pytest.raises(TypeError):
        reported("x").is_in(*nothing)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2**53 + 1, 10**400])
def test_numbers_must_arrive_exactly(value: float) -> None:
    with pytest.raises(ValueError):
        _ = reported("x") < value
    with pytest.raises(ValueError):
        reported("x").eq(value)


def test_large_exact_integers_are_fine() -> None:
    assert (reported("x") < 2**60).values[0].number_value == 2.0**60


def test_double_equals_is_not_a_condition() -> None:
    accident: object = reported("x") == 3  # type: ignore[comparison-overlap]
    assert accident is False
    with pytest.raises(TypeError, match=r"use \.eq\(\) and \.ne\(\)"):
        where(accident)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"reported\('x'\)\.exists\(\)"):
        where(reported("x"))  # type: ignore[arg-type]


# --- where() ----------------------------------------------------------------


def test_where_builds_the_example_filter() -> None:
    got = where(
        reported("fw.version") < "2.4",
        reported("mode").ne("eco"),
        desired("fw.target").exists(),
        reported("temp") >= 40,
        reported("region").is_in("eu", "us"),
        statuses=["ONLINE"],
        sync_statuses=["PENDING", "STALE"],
        tag_selectors=[filter_pb2.TagSelector(key="env", operator=filter_pb2.TagSelector.EXISTS)],
    )
    want = filter_pb2.DeviceFilter(
        statuses=[status_pb2.ONLINE],
        sync_statuses=[twin_pb2.Twin.PENDING, twin_pb2.Twin.STALE],
        tag_selectors=[filter_pb2.TagSelector(key="env", operator=filter_pb2.TagSelector.EXISTS)],
        twin_conditions=[
            cond(Doc.REPORTED, "fw.version", Op.LESS, s("2.4")),
            cond(Doc.REPORTED, "mode", Op.NOT_EQUALS, s("eco")),
            cond(Doc.DESIRED, "fw.target", Op.EXISTS),
            cond(Doc.REPORTED, "temp", Op.GREATER_OR_EQUAL, n(40)),
            cond(Doc.REPORTED, "region", Op.IN, s("eu"), s("us")),
        ],
    )
    assert got == want
    assert device_filter(got) is got  # a FilterLike as it is


def test_where_appends_conditions_after_keyword_ones() -> None:
    env = filter_pb2.TagSelector(key="env", operator=filter_pb2.TagSelector.EXISTS)
    got = where(
        reported("b").exists(),
        env,
        desired("c").missing(),
        twin_conditions=[
            reported("a").eq(1),
            {"document": "DESIRED", "path": "z", "operator": "EQUALS", "values": [None]},
        ],
        tag_selectors=[{"key": "tier", "operator": "IN", "values": ["a", "b"]}],
    )
    assert list(got.twin_conditions) == [
        reported("a").eq(1),
        desired("z").eq(None),
        reported("b").exists(),
        desired("c").missing(),
    ]
    assert list(got.tag_selectors) == [
        filter_pb2.TagSelector(key="tier", operator=filter_pb2.TagSelector.IN, values=["a", "b"]),
        env,
    ]


def test_where_takes_every_field_by_keyword() -> None:
    seen = datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    before = timestamp_pb2.Timestamp(seconds=1_800_000_000)
    got = where(
        status=status_pb2.STALE,
        statuses=["ONLINE", status_pb2.OFFLINE],
        tags=["production"],
        site_id="site-01",
        site_ids=["site-02"],
        include_decommissioned=True,
        device_id_prefix="DEV-",
        name_prefix="Boiler",
        last_seen_after=seen,
        last_seen_before=before,
        models=["m1", ""],
        sync_statuses=[twin_pb2.Twin.SYNCED],
        desired_version={"min": 3},
        reported_version=version_range(max=7),
    )
    want = filter_pb2.DeviceFilter(
        status=status_pb2.STALE,
        statuses=[status_pb2.ONLINE, status_pb2.OFFLINE],
        tags=["production"],
        site_id="site-01",
        site_ids=["site-02"],
        include_decommissioned=True,
        device_id_prefix="DEV-",
        name_prefix="Boiler",
        last_seen_before=before,
        models=["m1", ""],
        sync_statuses=[twin_pb2.Twin.SYNCED],
        desired_version=filter_pb2.VersionRange(min=3),
        reported_version=filter_pb2.VersionRange(max=7),
    )
    want.last_seen_after.FromDatetime(datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC))
    assert got == want
    assert got.desired_version.HasField("min") and not got.desired_version.HasField("max")


def test_where_with_nothing_is_the_empty_filter() -> None:
    got = where()
    assert got == filter_pb2.DeviceFilter()
    assert where(desired_version={}).HasField("desired_version")


def test_version_range() -> None:
    zero = version_range(min=0)
    assert zero.HasField("min") and zero.min == 0 and not zero.HasField("max")
    assert version_range(1, 5) == filter_pb2.VersionRange(min=1, max=5)
    assert version_range() == filter_pb2.VersionRange()
    with pytest.raises(TypeError, match="min must be an int"):
        version_range(min=True)
    with pytest.raises(TypeError, match="max must be an int"):
        version_range(max="3")  # type: ignore[arg-type]


def test_where_refuses_bad_fields() -> None:
    with pytest.raises(json_format.ParseError):
        where(statuses=["ASLEEP"])  # type: ignore[list-item]
    with pytest.raises(json_format.ParseError):
        where(colour="red")  # type: ignore[call-arg]
    with pytest.raises(json_format.ParseError):
        where(site_ids="site-01")
    with pytest.raises(ValueError, match="naive datetime"):
        where(last_seen_after=datetime(2024, 5, 1))


def test_the_server_accepts_what_where_builds() -> None:
    built = where(
        reported(key("net", "wlan.0", "ip")).eq("10.0.0.1"),
        reported("temp") >= 40.5,
        reported("fw.version") < "2.4",
        desired("mode").is_in("eco", None, True, 3),
        desired("fw.target").exists(),
        reported("old").missing(),
        reported("x").ne(False),
        statuses=["ONLINE"],
        sync_statuses=["PENDING", "STALE"],
        desired_version={"min": 3, "max": 9},
    )
    parsed = parse_filter(json_format.MessageToDict(built, preserving_proto_field_name=True))
    assert len(parsed.twin_conditions) == 7
    assert ("net", "wlan.0", "ip") in {c.path for c in parsed.twin_conditions}


# --- the typed keyword fields stay in step with the proto -----------------


def test_filter_fields_name_every_device_filter_field() -> None:
    fields = typing.get_type_hints(pc.FilterFields)
    assert set(fields) == set(filter_pb2.DeviceFilter.DESCRIPTOR.fields_by_name)


def test_enum_names_match_the_proto() -> None:
    statuses = set(status_pb2.ConnectivityStatus.keys()) - {"CONNECTIVITY_STATUS_UNSPECIFIED"}
    assert set(typing.get_args(_filters.StatusName)) == statuses
    sync = set(twin_pb2.Twin.SyncStatus.keys()) - {"SYNC_STATUS_UNSPECIFIED"}
    assert set(typing.get_args(_filters.SyncStatusName)) == sync
