"""/metrics counts what was done, and the Grafana dashboard only asks for
metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiomqtt
import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase
from pulse_client import AsyncPulseClient, NotFound

from server.observability import metrics
from tests.conftest import Tenant
from tests.helpers import eventually
from tests.observability.conftest import scrape
from tests.twin.conftest import EvaluatorFactory, create_devices
from tests.twin.test_ingest import reported, send

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pulse.json"
REGISTRY = "pulse.device.v1.DeviceRegistryService"


async def test_scraped_counters_equal_the_work_done(
    client: AsyncPulseClient,
    tenant: Tenant,
    http: httpx.AsyncClient,
    mqtt: aiomqtt.Client,
    start_evaluator: EvaluatorFactory,
) -> None:
    await start_evaluator()
    await create_devices(client, "M1")
    before = await scrape(http)

    for _ in range(7):
        await client.devices.get("M1")
    for _ in range(3):
        with pytest.raises(NotFound):
            await client.devices.get("NOPE")
    auth = {"authorization": f"Bearer {tenant.token()}"}
    for _ in range(4):
        assert (await http.get("/customer/devices/M1", headers=auth)).status_code == 200
    for _ in range(2):
        assert (await http.get("/customer/devices/NOPE", headers=auth)).status_code == 404
    for _ in range(5):
        await send(mqtt, tenant.tenant_id, "M1", b"{not json")
    for _ in range(2):
        await send(mqtt, tenant.tenant_id, "NOPE", reported({"a": 1}, 0))

    def rejected(scraped: object) -> float:
        assert hasattr(scraped, "value")
        return float(scraped.value("pulse_ingest_rejected_total", kind="twin/reported"))

    async def all_rejected() -> bool:
        return rejected(await scrape(http)) - rejected(before) >= 7

    await eventually(all_rejected, what="seven rejections in /metrics")
    after = await scrape(http)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    get = {"grpc_service": REGISTRY, "grpc_method": "GetDevice", "grpc_type": "unary"}
    # The gateway's calls are gRPC calls too.
    assert delta("grpc_server_started_total", **get) == 16
    assert delta("grpc_server_handled_total", **get, grpc_code="OK") == 7 + 4
    assert delta("grpc_server_handled_total", **get, grpc_code="NOT_FOUND") == 3 + 2
    assert delta("grpc_server_handling_seconds_count", **get) == 16
    assert delta("grpc_server_handling_seconds_bucket", **get, le="+Inf") == 16

    route = "/customer/devices/{device_id}"
    assert delta("pulse_http_requests_total", route=route, method="GET", status="200") == 4
    assert delta("pulse_http_requests_total", route=route, method="GET", status="404") == 2
    assert delta("pulse_http_request_duration_seconds_count", route=route) == 6

    assert delta("pulse_ingest_messages_total", kind="twin/reported") == 7
    assert delta("pulse_ingest_rejected_total", kind="twin/reported", reason="malformed_json") == 5
    assert delta("pulse_ingest_rejected_total", kind="twin/reported", reason="unknown_device") == 2

    # Every call took a connection from the server's pool and gave it back.
    assert delta("pulse_db_pool_acquire_seconds_count", pool="server") >= 16
    assert after.value("pulse_db_pool_waiting", pool="server") == 0
    in_use = after.value("pulse_db_pool_connections_in_use", pool="server")
    assert 0 <= in_use <= after.value("pulse_db_pool_max_connections", pool="server")


async def test_watch_streams_are_counted_while_open(
    client: AsyncPulseClient, http: httpx.AsyncClient
) -> None:
    await create_devices(client, "W1")
    open_before = (await scrape(http)).value("pulse_watch_streams_open")

    async def opened() -> bool:
        return (await scrape(http)).value("pulse_watch_streams_open") == open_before + 1

    async with client.connectivity.watch(device_ids=["W1"]):
        await eventually(opened, what="the open stream in /metrics")

    async def closed() -> bool:
        return (await scrape(http)).value("pulse_watch_streams_open") == open_before

    await eventually(closed, what="the closed stream leaving /metrics")


# Words of PromQL that are not metric names: keywords, and label names inside
# by (...), which are removed before looking.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # groupings
    found = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {name for name in found if name.lower() not in _KEYWORDS}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_the_query_parser_finds_metric_names() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, grpc_method) ("
        'rate(grpc_server_handling_seconds_bucket{grpc_type="unary"}[$__rate_interval])))'
        " / on (job) group_left max(up_total) > bool 1"
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "up_total"}


async def test_every_dashboard_query_names_a_metric_that_exists(http: httpx.AsyncClient) -> None:
    exposed = (await scrape(http)).names
    queries = dashboard_queries()
    assert len(queries) >= 20
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exposed, f"{expr!r} reads {sorted(names - exposed)}, not exported"


def test_the_dashboard_shows_every_metric_the_processes_export() -> None:
    queried = {name for expr in dashboard_queries() for name in metric_names(expr)}
    defined = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    assert len(defined) >= 20
    for metric in defined:
        name = metric._name
        assert any(q == name or q.startswith(name + "_") for q in queried), (
            f"{name} is on no dashboard panel"
        )


async def test_what_clients_send_never_becomes_a_label(http: httpx.AsyncClient) -> None:
    """Paths and methods are the client's to choose; series are not."""
    before = await scrape(http)
    assert (await http.request("PROPFIND", "/customer/devices/anything")).status_code == 405
    assert (await http.get("/no/such/page-1234")).status_code == 404
    after = await scrape(http)
    assert after.value("pulse_http_requests_total", method="other", route="other") == (
        before.value("pulse_http_requests_total", method="other", route="other") + 1
    )
    labels = {v for _, have, _ in after.samples for v in have.values()}
    assert not {"PROPFIND", "/customer/devices/anything", "/no/such/page-1234"} & labels
