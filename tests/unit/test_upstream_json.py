"""The gateway's upstream-facing JSON: the declared route table, and the
field and enum options it reads from the protos."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pulse.device.v1 import connectivity_pb2, groups_pb2, twin_pb2

from server.app import SERVICE_NAMES
from server.gateway import transcode, upstream
from server.gateway.routes import routes_for
from server.gateway.serve import services


def test_every_declared_upstream_route_is_an_annotated_route() -> None:
    routes = routes_for(services(SERVICE_NAMES))
    annotated = {(r.http_method, r.template) for r in routes}
    assert set(upstream.ROUTES) <= annotated
    assert {(r.http_method, r.template) for r in routes if r.upstream} == set(upstream.ROUTES)
    # Defaults name fields of the route's request.
    for route in routes:
        if route.upstream is not None:
            transcode.build_request(
                route.request_class,
                body_field="",
                body=b"",
                path_params={},
                query=(),
                headers={},
                defaults=route.upstream.defaults,
            )


def _request(
    cls: type, query: list[tuple[str, str]], body: bytes = b"", body_field: str = ""
) -> object:
    return transcode.build_request(
        cls, body_field=body_field, body=body, path_params={}, query=query, headers={}
    )


def test_enum_values_read_in_either_spelling_and_write_in_upstreams() -> None:
    for spelling in ("dynamic", "DYNAMIC"):
        request = _request(
            groups_pb2.CreateGroupRequest,
            [],
            body=b'{"name": "g", "group_type": "%s"}' % spelling.encode(),
            body_field="group",
        )
        assert isinstance(request, groups_pb2.CreateGroupRequest)
        assert request.group.group_type == groups_pb2.Group.DYNAMIC
    twin = twin_pb2.Twin(sync_status=twin_pb2.Twin.STALE)
    assert transcode.to_json(twin)["sync_status"] == "stale"
    # A value without a json_value keeps its name.
    event = connectivity_pb2.ConnectionEvent(event_type=connectivity_pb2.CONNECTION_LOST)
    assert transcode.to_json(event)["event_type"] == "CONNECTION_LOST"


def test_json_name_query_parameters_and_unknown_ones() -> None:
    request = _request(
        connectivity_pb2.ListConnectionEventsRequest,
        [("offset", "20"), ("limit", "10"), ("format", "json"), ("_", "1733030400000")],
    )
    assert isinstance(request, connectivity_pb2.ListConnectionEventsRequest)
    assert (request.skip, request.limit) == (20, 10)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_string_ids_and_numeric_versions(n: int) -> None:
    event = transcode.to_json(connectivity_pb2.ConnectionEvent(id=n))
    assert event["id"] == str(n)
    twin = transcode.to_json(twin_pb2.Twin(desired_version=n))
    assert twin["desired_version"] == (n if n < 2**53 else str(n))


def test_aliases_repeat_the_value_or_write_null() -> None:
    group = groups_pb2.Group(group_id="g")
    group.create_time.FromSeconds(1_700_000_000)
    out = transcode.to_json(group)
    assert out["created_at"] == out["create_time"] == "2023-11-14T22:13:20Z"
    assert out["updated_at"] is None and "update_time" not in out
