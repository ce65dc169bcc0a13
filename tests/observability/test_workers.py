"""`pulse serve --workers 2`: two servers on one port, a worker restarted
under load without losing a call the client retries, and metrics that add
up across workers."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from pathlib import Path

import httpx
import psutil
from pulse_client import AsyncPulseClient, PulseError

from server.auth import Role, mint_token
from tests.conftest import TenantFactory
from tests.helpers import eventually
from tests.observability.conftest import PulseProcess, pulse_process, scrape

# What a client that retries reads does: UNAVAILABLE (a worker stopping) is
# tried again, on another connection. So is CANCELLED: gRPC core resets the
# calls that reached a stopping server but no handler yet with CANCEL, not
# REFUSED_STREAM (grpc/grpc#41785, open): never processed, safe to retry.
RETRYING = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "pulse.device.v1.DeviceRegistryService"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    }
)


def listeners(serve: PulseProcess) -> dict[int, bool]:
    """The supervisor's workers: pid -> whether it listens on the gRPC port."""
    found = {}
    for child in psutil.Process(serve.process.pid).children():
        with_port = [
            c
            for c in child.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == serve.grpc_port
        ]
        found[child.pid] = bool(with_port)
    return found


async def test_two_workers_share_a_port_and_a_restart_loses_no_retried_call(
    dsn: str, tmp_path: Path, make_tenant: TenantFactory
) -> None:
    secret = secrets.token_hex(32)
    tenant_id = (await make_tenant()).tenant_id  # tokens signed with this process's secret
    token = mint_token(secret.encode(), tenant_id=tenant_id, role=Role.ADMIN)

    serving = pulse_process("serve", dsn, tmp_path, "--workers", "2", PULSE_SECRET=secret)
    async with serving as serve:

        def both_listen() -> bool:
            found = listeners(serve)
            return len(found) == 2 and all(found.values())

        await eventually(both_listen, timeout=30, what="two workers listening on one port")
        first = set(listeners(serve))

        client = await AsyncPulseClient.connect(
            f"127.0.0.1:{serve.grpc_port}",
            token=token,
            options=[("grpc.enable_retries", 1), ("grpc.service_config", RETRYING)],
        )
        try:
            await client.devices.create("W-1")
            before = await scrape(serve.http)
            succeeded = 0
            failed: list[PulseError] = []
            stop_at = time.monotonic() + 4

            async def caller() -> None:
                nonlocal succeeded
                while time.monotonic() < stop_at:
                    try:
                        await client.devices.get("W-1")
                    except PulseError as error:
                        failed.append(error)
                    else:
                        succeeded += 1

            callers = [asyncio.create_task(caller()) for _ in range(16)]
            await asyncio.sleep(1)
            victim = min(first)
            os.kill(victim, signal.SIGTERM)
            await asyncio.gather(*callers)
        finally:
            await client.close()

        assert failed == []
        assert succeeded > 100

        def replaced() -> bool:
            found = listeners(serve)
            return len(found) == 2 and all(found.values()) and victim not in found

        await eventually(replaced, timeout=30, what="the stopped worker replaced")

        # Whichever worker answers the scrape counts every worker's calls,
        # the stopped one's included.
        after = await scrape(serve.http)
        get = {"grpc_method": "GetDevice", "grpc_code": "OK"}
        handled = after.value("grpc_server_handled_total", **get)
        assert handled - before.value("grpc_server_handled_total", **get) == succeeded
    log = serve.log_file.read_text()
    assert f"worker 0 (pid {victim}) exited with 0; starting it again" in log or (
        f"worker 1 (pid {victim}) exited with 0; starting it again" in log
    )


async def test_gateway_workers_share_a_port_and_their_metrics(
    dsn: str, target: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    gateway = pulse_process(
        "gateway",
        dsn,
        tmp_path,
        "--grpc-target",
        target,
        "--workers",
        "2",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    async with gateway as process:

        def both_listen() -> bool:
            children = psutil.Process(process.process.pid).children()
            ports = [
                c.laddr.port
                for child in children
                for c in child.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            ]
            return len(children) == 2 and ports == [process.http.base_url.port] * 2

        await eventually(both_listen, timeout=30, what="two gateway workers on one port")
        before = (await scrape(process.http)).value("pulse_http_requests_total", route="/healthz")
        for _ in range(40):
            # A connection each, so that the kernel spreads them.
            async with httpx.AsyncClient(base_url=str(process.http.base_url)) as fresh:
                response = await fresh.get("/healthz")
                assert response.status_code == 200
        after = (await scrape(process.http)).value("pulse_http_requests_total", route="/healthz")
        assert after - before == 40
        # Both served some: each worker keeps its counters in a file of its own.
        pids = {child.pid for child in psutil.Process(process.process.pid).children()}
        assert {f"counter_{pid}.db" for pid in pids} <= {p.name for p in metrics_dir.iterdir()}


async def test_workers_stop_when_their_supervisor_is_killed(dsn: str, tmp_path: Path) -> None:
    serving = pulse_process("serve", dsn, tmp_path, "--workers", "2")
    async with serving as serve:

        def both_listen() -> bool:
            found = listeners(serve)
            return len(found) == 2 and all(found.values())

        await eventually(both_listen, timeout=30, what="two workers listening")
        orphans = [psutil.Process(pid) for pid in listeners(serve)]
        serve.process.kill()  # no chance to stop them
        await serve.process.wait()

        def all_gone() -> bool:
            return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)

        await eventually(all_gone, timeout=15, what="the workers stopping by themselves")
    assert serve.log_file.read_text().count("the supervisor (pid") == 2
