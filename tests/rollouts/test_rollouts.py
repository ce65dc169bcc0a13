"""Rollouts end to end: the API, the engine, the evaluator and simulated
devices acknowledging over MQTT. Devices without a simulator never
acknowledge, so their writes time out or wait."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aiomqtt
from pulse_client import AsyncPulseClient

from server import wire
from tests.conftest import Tenant
from tests.rollouts.conftest import EngineFactory
from tests.rollouts.helpers import (
    DeviceState,
    State,
    desired,
    device_states,
    simulated,
    until_rollout,
)
from tests.twin.conftest import EvaluatorFactory, create_devices


async def _static_group(client: AsyncPulseClient, group_id: str, device_ids: list[str]) -> None:
    await client.groups.create_static(group_id, group_id=group_id)
    await client.groups.add_members(group_id, device_ids)


async def test_a_rollout_writes_each_device_once_and_succeeds_when_they_report_it(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
    start_engine: EngineFactory,
) -> None:
    ids = [f"R-{n}" for n in range(6)]
    await create_devices(client, *ids)
    await client.twin.update_desired("R-0", {"mode": "eco", "fw": "1.0"}, expected_version=0)
    await _static_group(client, "pumps", ids[:5])
    await start_evaluator()
    async with simulated(mqtt_url, tenant.tenant_id, ids):
        rollout = await client.rollouts.create(
            group_id="pumps", patch={"fw": "2.0"}, description="firmware 2.0"
        )
        assert rollout.state == State.RUNNING
        assert rollout.counts.pending == 5
        await start_engine()
        done = await until_rollout(
            client, rollout.rollout_id, lambda r: r.state == State.SUCCEEDED, what="success"
        )
    assert done.counts.succeeded == 5 and done.counts.pending == done.counts.applied == 0
    assert done.state_reason == "every device has an outcome: 5 succeeded"
    assert done.HasField("end_time")
    # The patch merged into what each device had, in one write each.
    assert await desired(client, "R-0") == ({"mode": "eco", "fw": "2.0"}, 2)
    for device_id in ids[1:5]:
        assert await desired(client, device_id) == ({"fw": "2.0"}, 1)
    assert await desired(client, "R-5") == ({}, 0)  # not in the group
    states = await device_states(client, rollout.rollout_id)
    assert states == dict.fromkeys(ids[:5], "SUCCEEDED")
    devices = {d.device_id: d async for d in client.rollouts.list_devices(rollout.rollout_id)}
    assert devices["R-0"].desired_version == 2 and devices["R-1"].desired_version == 1
    assert devices["R-0"].HasField("apply_time") and devices["R-0"].HasField("end_time")


async def test_a_failing_canary_aborts_before_the_rest_start(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
    start_engine: EngineFactory,
) -> None:
    ids = [f"C-{n}" for n in range(5)]
    await create_devices(client, *ids)
    await _static_group(client, "fleet", ids)
    await start_evaluator()
    await start_engine()
    # C-0, first in device_id order, is the canary: it acknowledges the
    # version and reports firmware.error instead of applying it.
    async with simulated(mqtt_url, tenant.tenant_id, ids, {"C-0": "fail"}):
        rollout = await client.rollouts.create(
            group_id="fleet",
            patch={"firmware": {"target": "2.4.1"}},
            canary_count=1,
            failure_path="firmware.error",
        )
        ended = await until_rollout(
            client, rollout.rollout_id, lambda r: r.state == State.ABORTED, what="abort"
        )
    assert ended.state_reason == ("canary device 'C-0' failed: reported \"simulated failure\"")
    assert ended.counts.failed == 1 and ended.counts.pending == 4
    for device_id in ids[1:]:
        assert await desired(client, device_id) == ({}, 0)
    failed = [
        d
        async for d in client.rollouts.list_devices(rollout.rollout_id, states=[DeviceState.FAILED])
    ]
    assert [(d.device_id, d.canary, d.desired_version) for d in failed] == [("C-0", True, 1)]


async def test_a_canary_that_times_out_aborts_too(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
    start_engine: EngineFactory,
) -> None:
    ids = ["T-1", "T-2", "T-3"]
    await create_devices(client, *ids)
    await start_evaluator()
    await start_engine()
    # The canaries receive the write and ignore it.
    async with simulated(mqtt_url, tenant.tenant_id, ids, dict.fromkeys(ids, "ignore")) as devices:
        rollout = await client.rollouts.create(
            filter={},
            patch={"x": 1},
            canary_count=2,
            device_timeout=timedelta(seconds=1),
        )
        ended = await until_rollout(
            client, rollout.rollout_id, lambda r: r.state == State.ABORTED, what="abort"
        )
        assert devices["T-1"].received_version == devices["T-2"].received_version == 1
    assert "timed out" in ended.state_reason
    assert ended.counts.timed_out == 2 and ended.counts.pending == 1
    states = await device_states(client, rollout.rollout_id)
    assert states == {"T-1": "TIMED_OUT", "T-2": "TIMED_OUT", "T-3": "PENDING"}
    assert await desired(client, "T-3") == ({}, 0)


async def test_an_operators_change_after_the_write_is_never_overwritten(
    client: AsyncPulseClient, start_engine: EngineFactory
) -> None:
    await create_devices(client, "O-1", "O-2")
    await start_engine()
    rollout = await client.rollouts.create(
        filter={}, patch={"mode": "eco", "fw": "2"}, device_timeout=timedelta(minutes=5)
    )
    await until_rollout(client, rollout.rollout_id, lambda r: r.counts.applied == 2, what="writes")
    # One operator changes a value the rollout set, the other one it did not.
    await client.twin.patch_desired("O-1", {"mode": "boost"}, expected_version=1)
    await client.twin.patch_desired("O-2", {"led": "off"}, expected_version=1)
    ended = await until_rollout(
        client, rollout.rollout_id, lambda r: r.counts.superseded == 1, what="superseded"
    )
    assert ended.counts.applied == 1
    states = await device_states(client, rollout.rollout_id)
    assert states == {"O-1": "SUPERSEDED", "O-2": "APPLIED"}
    assert await desired(client, "O-1") == ({"mode": "boost", "fw": "2"}, 2)
    assert await desired(client, "O-2") == ({"mode": "eco", "fw": "2", "led": "off"}, 2)
    await client.rollouts.cancel(rollout.rollout_id)
    assert await desired(client, "O-1") == ({"mode": "boost", "fw": "2"}, 2)


async def test_the_abort_rule_counts_failures_and_timeouts_after_the_minimum(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt: aiomqtt.Client,
    start_evaluator: EvaluatorFactory,
    start_engine: EngineFactory,
) -> None:
    ids = [f"A-{n}" for n in range(8)]
    await create_devices(client, *ids)
    await start_evaluator()
    await start_engine()
    rollout = await client.rollouts.create(
        filter={},
        patch={"fw": "3"},
        failure_path="fw_error",
        abort_threshold_percent=25,
        abort_min_count=4,
        max_per_minute=0,
    )
    await until_rollout(client, rollout.rollout_id, lambda r: r.counts.applied == 8, what="writes")

    async def report(device_id: str, state: dict[str, object]) -> None:
        topic = wire.topic(tenant.tenant_id, device_id, "twin/reported")
        await mqtt.publish(topic, wire.reported(state, 1), qos=1)

    # 1 of 3 outcomes failed: 33%, above 25%, but fewer than 4 outcomes.
    await report("A-0", {"fw": "3"})
    await report("A-1", {"fw": "3"})
    await report("A-2", {"fw_error": "no space"})
    await until_rollout(
        client,
        rollout.rollout_id,
        lambda r: r.counts.succeeded + r.counts.failed == 3,
        what="three outcomes",
    )
    assert (await client.rollouts.get(rollout.rollout_id)).state == State.RUNNING
    await report("A-3", {"fw": "3"})
    await report("A-4", {"fw": "3"})
    await report("A-5", {"fw": "3"})
    await until_rollout(
        client, rollout.rollout_id, lambda r: r.counts.succeeded == 5, what="five successes"
    )
    # 1 of 6: 17%. Then a second failure: 2 of 7, 29%.
    assert (await client.rollouts.get(rollout.rollout_id)).state == State.RUNNING
    await report("A-6", {"fw_error": "checksum"})
    ended = await until_rollout(
        client, rollout.rollout_id, lambda r: r.state == State.ABORTED, what="abort"
    )
    assert ended.state_reason == (
        "2 of 7 devices with an outcome failed or timed out (28.6%, above the threshold of 25%)"
    )
    # Written devices are still followed after the abort.
    await report("A-7", {"fw": "3"})
    await until_rollout(
        client, rollout.rollout_id, lambda r: r.counts.succeeded == 6, what="the last outcome"
    )


async def test_a_continuous_rollout_targets_devices_that_enter_the_group_later(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,
    start_engine: EngineFactory,
) -> None:
    await client.devices.create("K-1", tags={"role": "pump"})
    await client.devices.create("K-2", tags={"role": "valve"})
    group = await client.groups.create_dynamic(
        "pumps", {"tag_selectors": [{"key": "role", "operator": "EQUALS", "values": ["pump"]}]}
    )
    await start_evaluator()
    await start_engine()
    async with simulated(mqtt_url, tenant.tenant_id, ["K-1", "K-2", "K-3"]):
        rollout = await client.rollouts.create(
            group_id=group.group_id, patch={"interval_s": 30}, continuous=True
        )
        await until_rollout(
            client, rollout.rollout_id, lambda r: r.counts.succeeded == 1, what="K-1"
        )
        # A device created into the group, and one that moves into it.
        await client.devices.create("K-3", tags={"role": "pump"})
        await client.devices.update("K-2", tags={"role": "pump"})
        later = await until_rollout(
            client, rollout.rollout_id, lambda r: r.counts.succeeded == 3, what="the newcomers"
        )
    assert later.state == State.RUNNING  # continuous: until cancelled
    for device_id in ("K-1", "K-2", "K-3"):
        assert await desired(client, device_id) == ({"interval_s": 30}, 1)
    cancelled = await client.rollouts.cancel(rollout.rollout_id)
    assert cancelled.state == State.CANCELLED and cancelled.HasField("end_time")


async def test_a_device_that_left_the_target_before_its_turn_is_skipped(
    client: AsyncPulseClient, start_engine: EngineFactory
) -> None:
    ids = ["S-1", "S-2", "S-3"]
    await create_devices(client, *ids)
    await _static_group(client, "batch", ids)
    rollout = await client.rollouts.create(group_id="batch", patch={"a": 1})
    await client.groups.remove_members("batch", ["S-2"])
    await client.devices.decommission("S-3")
    await start_engine()
    await until_rollout(
        client, rollout.rollout_id, lambda r: r.counts.skipped == 2, what="two skipped"
    )
    devices = {d.device_id: d async for d in client.rollouts.list_devices(rollout.rollout_id)}
    assert DeviceState.Name(devices["S-1"].state) == "APPLIED"
    assert devices["S-2"].detail == "left the target"
    assert DeviceState.Name(devices["S-3"].state) == "SKIPPED"
    assert await desired(client, "S-2") == ({}, 0)


async def test_pause_stops_starts_and_resume_continues(
    client: AsyncPulseClient, start_engine: EngineFactory
) -> None:
    ids = [f"P-{n}" for n in range(4)]
    await create_devices(client, *ids)
    rollout = await client.rollouts.create(filter={}, patch={"a": 1}, max_per_minute=60)
    await start_engine()
    await until_rollout(client, rollout.rollout_id, lambda r: r.counts.applied == 1, what="first")
    paused = await client.rollouts.pause(rollout.rollout_id)
    assert paused.state == State.PAUSED
    # At 60 a minute the next start was due a second after the first: two
    # and a half seconds paused would have started two more.
    await asyncio.sleep(2.5)
    still = await client.rollouts.get(rollout.rollout_id)
    assert still.state == State.PAUSED and still.counts.applied == 1
    resumed = await client.rollouts.resume(rollout.rollout_id)
    assert resumed.state == State.RUNNING
    await until_rollout(client, rollout.rollout_id, lambda r: r.counts.applied == 2, what="next")
