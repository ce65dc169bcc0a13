"""WatchRollout: progress and device transitions, resumable, and over SSE."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
from pulse.device.v1 import rollouts_pb2
from pulse_client import AsyncPulseClient

from server.app import SERVICE_NAMES
from server.gateway.serve import running_gateway
from tests.conftest import Tenant
from tests.rollouts.conftest import EngineFactory
from tests.rollouts.helpers import DeviceState, State, simulated
from tests.twin.conftest import EvaluatorFactory, create_devices

Message = rollouts_pb2.WatchRolloutResponse


def _describe(m: Message) -> tuple[str, str]:
    if m.HasField("device"):
        return m.device.device_id, DeviceState.Name(m.device.state)
    return "rollout", State.Name(m.rollout.state)


async def test_a_watch_follows_a_rollout_to_its_end(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
    start_engine: EngineFactory,
) -> None:
    ids = ["W-1", "W-2", "W-3"]
    await create_devices(client, *ids)
    await start_evaluator()
    rollout = await client.rollouts.create(filter={}, patch={"fw": "9"})
    seen: list[Message] = []
    async with simulated(mqtt_url, tenant.tenant_id, ids):
        stream = client.rollouts.watch(rollout.rollout_id)
        first = await anext(stream)
        assert first.rollout.state == State.RUNNING and first.rollout.counts.pending == 3
        await start_engine()
        async for message in stream:  # ends by itself
            seen.append(message)
    assert all(m.cursor for m in [first, *seen])
    last = seen[-1]
    assert _describe(last) == ("rollout", "SUCCEEDED")
    assert last.rollout.counts.succeeded == 3
    finals = {m.device.device_id: _describe(m)[1] for m in seen if m.HasField("device")}
    assert finals == dict.fromkeys(ids, "SUCCEEDED")
    # The counts sent never run ahead of the devices sent before them.
    succeeded: set[str] = set()
    for m in seen:
        if m.HasField("device") and m.device.state == DeviceState.SUCCEEDED:
            succeeded.add(m.device.device_id)
        elif m.HasField("rollout"):
            assert m.rollout.counts.succeeded == len(succeeded)


async def test_a_watch_resumes_after_its_cursor_without_repeats(
    client: AsyncPulseClient, start_engine: EngineFactory
) -> None:
    ids = ["X-1", "X-2", "X-3"]
    await create_devices(client, *ids)
    # One a second, so that the writes are separate changes; each device
    # times out well after the next one's start.
    rollout = await client.rollouts.create(
        filter={}, patch={"a": 1}, max_per_minute=60, device_timeout=timedelta(seconds=3)
    )
    await start_engine()
    stream = client.rollouts.watch(rollout.rollout_id)
    devices: list[Message] = []
    async for message in stream:
        if message.HasField("device"):
            devices.append(message)
            if len(devices) == 2:
                break
    stream.cancel()
    assert [_describe(m) for m in devices] == [("X-1", "APPLIED"), ("X-2", "APPLIED")]
    resumed = client.rollouts.watch(rollout.rollout_id, resume_cursor=devices[0].cursor)
    after: list[tuple[str, str]] = []
    async for message in resumed:  # ends with the rollout
        after.append(_describe(message))
    # From X-2's write on, each change once (a device that changed twice
    # between two reads would be sent once, in its latest state); then the end.
    changes = [d for d in after if d[0] != "rollout"]
    assert changes[0] == ("X-2", "APPLIED")
    assert len(set(changes)) == len(changes)
    assert set(changes) <= {
        ("X-2", "APPLIED"),
        ("X-3", "APPLIED"),
        ("X-1", "TIMED_OUT"),
        ("X-2", "TIMED_OUT"),
        ("X-3", "TIMED_OUT"),
    }
    assert {d: s for d, s in changes} == dict.fromkeys(ids, "TIMED_OUT")
    assert after[-1] == ("rollout", "SUCCEEDED")
    final = await client.rollouts.get(rollout.rollout_id)
    assert final.state_reason == "every device has an outcome: 3 timed out"


async def test_a_watch_over_server_sent_events(
    target: str, tenant: Tenant, client: AsyncPulseClient
) -> None:
    await create_devices(client, "Y-1")
    rollout = await client.rollouts.create(filter={}, patch={"a": 1})
    async with (
        running_gateway(target, SERVICE_NAMES, host="127.0.0.1", port=0) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        headers = {"Authorization": f"Bearer {tenant.token()}", "Accept": "text/event-stream"}
        url = f"/customer/rollouts/{rollout.rollout_id}:watch"
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            lines: list[str] = []
            async for line in response.aiter_lines():
                if not line and lines:
                    break  # the end of the first event
                lines.append(line)
    event = dict(line.split(": ", 1) for line in lines)
    data = json.loads(event["data"])
    assert data["rollout"]["rollout_id"] == rollout.rollout_id
    assert data["rollout"]["counts"]["pending"] == 1
    assert event["id"] == data["cursor"]
