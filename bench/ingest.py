"""Reported-state ingest: MQTT messages per second into PostgreSQL, beside a
bare aiomqtt subscriber that only counts messages from the same broker.

In one run, alternating rounds of each:
  - bare: an aiomqtt client (same session settings as the evaluator) that
    counts the messages it receives (the broker-and-client ceiling);
  - pulse: the evaluator's MQTT loop with the twin ingest handler, timed
    until the last message's effect is in PostgreSQL (RLS on, one statement
    per tenant per batch).
A publisher subprocess (paho, QoS 1) sends `twin/reported` messages for
3,000 devices with rising versions, and is kept at most WINDOW messages
ahead of the consumer, so the broker's per-client queue (Mosquitto's
default is 1,000 messages) never overflows and drops QoS 1 messages. At the
end, every device's stored report must be its last message.

    MQTT_URL=mqtt://127.0.0.1:1883 .venv/bin/python -m bench.ingest

Without MQTT_URL it uses the embedded amqtt broker (access control on, the
publisher and evaluator a service identity), which is far slower than
Mosquitto, so the ratio then mostly measures amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiomqtt

from bench.harness import ROOT, run, scratch_database, seed_tenant
from evaluator.runtime import Evaluator
from evaluator.service import mqtt_broker
from evaluator.twin_ingest import TwinIngest
from server import wire
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_broker

DEVICES = 3000
PER_ROUND = 30_000
ROUNDS = 3
WINDOW = 800
CHUNK = 100
GOAL = 0.5


def _payload(k: int) -> bytes:
    state = {"seq": k, "temp_c": 20 + k % 10, "fw": "1.4.2", "rssi": -60 - k % 7}
    return json.dumps({"state": state, "desired_version": k // DEVICES + 1}).encode()


def _device(k: int) -> str:
    return f"ING-{k % DEVICES:05d}"


def _publisher() -> None:
    """The subprocess: publish as many messages as each stdin line grants."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = parse_broker(os.environ["BENCH_MQTT_URL"])
    tenant = uuid.UUID(os.environ["BENCH_TENANT"])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(200)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    k = 0
    for line in sys.stdin:
        for _ in range(int(line)):
            client.publish(wire.topic(tenant, _device(k), "twin/reported"), _payload(k), qos=1)
            k += 1
    client.loop_stop()
    client.disconnect()


class Feed:
    """The publisher subprocess, fed credits."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.sent = 0

    async def grant(self, n: int) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{n}\n".encode())
        await self._proc.stdin.drain()
        self.sent += n


@contextlib.asynccontextmanager
async def publisher(mqtt_url: str, tenant: uuid.UUID) -> AsyncIterator[Feed]:
    env = {**os.environ, "BENCH_MQTT_URL": mqtt_url, "BENCH_TENANT": str(tenant)}
    env["BENCH_INGEST_PUBLISHER"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.ingest", cwd=ROOT, env=env, stdin=asyncio.subprocess.PIPE
    )
    try:
        yield Feed(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)


async def timed_round(
    feed: Feed, consumed: Callable[[], int], done: Callable[[], int], count: int
) -> float:
    """Messages per second until `done` reaches `count` more than before."""
    consumed_at, done_at, sent_at = consumed(), done(), feed.sent
    start = time.perf_counter()
    while done() - done_at < count:
        outstanding = (feed.sent - sent_at) - (consumed() - consumed_at)
        if feed.sent - sent_at < count and outstanding <= WINDOW - CHUNK:
            await feed.grant(min(CHUNK, count - (feed.sent - sent_at)))
            continue
        await asyncio.sleep(0.002)
    return count / (time.perf_counter() - start)


async def _forget_session(mqtt_url: str, client_id: str) -> None:
    options = parse_broker(mqtt_url).client_options()
    async with aiomqtt.Client(**options, identifier=client_id, clean_session=True):
        pass


async def main() -> None:
    async with contextlib.AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(scratch_database())
        access = Database(await create_pool(dsn, size=2))
        stack.push_async_callback(access.close)
        mqtt_url = await stack.enter_async_context(
            mqtt_broker(os.environ.get("MQTT_URL"), access, service="bench")
        )
        # Every version the publisher will send is one that was asked for.
        tenant = await seed_tenant(
            dsn, [_device(k) for k in range(DEVICES)], desired_version=1_000_000
        )
        prefix = f"pulse/{tenant}/"
        print(
            f"twin/reported ingest, QoS 1, {DEVICES} devices, {PER_ROUND:,} messages a round, "
            f"medians of {ROUNDS} rounds ({parse_broker(mqtt_url).safe_url})"
        )

        broker = parse_broker(mqtt_url).client_options()
        bare_id = f"bench-bare-{uuid.uuid4().hex[:8]}"
        eval_id = f"bench-evaluator-{uuid.uuid4().hex[:8]}"
        received = 0

        async def count(client: aiomqtt.Client) -> None:
            nonlocal received
            async for message in client.messages:
                if message.topic.value.startswith(prefix):
                    received += 1

        db = Database(await create_pool(dsn, size=10))
        ingest = TwinIngest(db)
        evaluator = Evaluator(mqtt_url, [ingest], client_id=eval_id)
        bare_rates, pulse_rates = [], []
        try:
            async with publisher(mqtt_url, tenant) as feed:
                for _ in range(ROUNDS):
                    async with aiomqtt.Client(
                        **broker, identifier=bare_id, clean_session=False, keepalive=30
                    ) as client:
                        await client.subscribe(wire.SUBSCRIPTION, qos=1)
                        counter = asyncio.create_task(count(client))
                        bare_rates.append(
                            await timed_round(feed, lambda: received, lambda: received, PER_ROUND)
                        )
                        counter.cancel()
                    # The bare client unsubscribes by leaving; its session
                    # must not queue the evaluator's share.
                    await _forget_session(mqtt_url, bare_id)

                    task = asyncio.create_task(evaluator.run())
                    await asyncio.wait_for(evaluator.connected.wait(), 10)
                    pulse_rates.append(
                        await timed_round(
                            feed,
                            lambda: evaluator.received,
                            lambda: ingest.accepted + ingest.rejected,
                            PER_ROUND,
                        )
                    )
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await _forget_session(mqtt_url, eval_id)
                total = feed.sent
            problems = await _verify(db, tenant, ingest, total)
        finally:
            await db.close()

        bare, pulse = statistics.median(bare_rates), statistics.median(pulse_rates)
        print(f"  {'bare aiomqtt subscriber (counts only)':<42} {bare:9,.0f}/s")
        print(
            f"  {'evaluator ingest, effects in PostgreSQL':<42} {pulse:9,.0f}/s  {pulse / bare:.0%}"
        )
        print(
            f"  accepted {ingest.accepted:,} (applied {ingest.counts['applied']:,}, superseded "
            f"within a batch {ingest.counts['superseded']:,}), rejected {ingest.rejected:,}"
        )
        print("  every device's stored report is its last message: " + (problems or "yes"))
        verdict = "met" if pulse >= GOAL * bare else "NOT met"
        print(f"  ingest is {pulse / bare:.0%} of the bare rate; goal >= {GOAL:.0%}: {verdict}")


async def _verify(db: Database, tenant: uuid.UUID, ingest: TwinIngest, end: int) -> str:
    """ "" if each device holds its last message (the last round is the
    evaluator's, and it is longer than one message per device)."""
    async with db.tenant(tenant, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id, reported, reported_version FROM device_state WHERE tenant_id = $1",
            tenant,
        )
    stored = {r["device_id"]: (r["reported"].get("seq"), r["reported_version"]) for r in rows}
    wrong = 0
    for k in range(end - DEVICES, end):
        if stored[_device(k)] != (k, k // DEVICES + 1):
            wrong += 1
    if wrong or ingest.rejected:
        return f"NO: {wrong} devices differ, {ingest.rejected} rejected"
    return ""


if __name__ == "__main__":
    if os.environ.get("BENCH_INGEST_PUBLISHER"):
        _publisher()
    else:
        run(main)
