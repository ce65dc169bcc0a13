"""Device identity on the embedded broker: what access control costs.

1. Reported-state ingest (the evaluator, effects in PostgreSQL) through the
   broker with access control on (every CONNECT checked against the
   database, every PUBLISH and delivery against server/broker_access/rules.py)
   beside the same broker with it off, rounds alternating in one run. The
   publisher is one service identity: the per-message checks are what is
   measured here; what a device's CONNECT costs is part 2.
2. Connect storm: 1,000 device CONNECTs (50 at a time) with credentials,
   first ever (scrypt) and again (the verified secret remembered), beside
   anonymous CONNECTs to the open broker.

    .venv/bin/python -m bench.device_access
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from dataclasses import replace

import aiomqtt

from bench.harness import run, scratch_database, seed_tenant
from bench.ingest import Feed, publisher, timed_round
from evaluator.broker import EmbeddedBroker
from evaluator.runtime import Evaluator
from evaluator.twin_ingest import TwinIngest
from server import mqtt_url
from server.broker_access.authenticator import Authenticator
from server.broker_access.rules import device_client_id, device_username
from server.credentials import hashing, services
from server.db import Database, create_pool

INGEST_DEVICES = 3000
PER_ROUND = 6000
ROUNDS = 3
STORM = 1000
STORM_CONCURRENCY = 50
GOAL = 0.90


def _ingest_device(k: int) -> str:
    return f"ING-{k % INGEST_DEVICES:05d}"


async def _ingest_round(broker_url: str, feed: Feed, db: Database, client_id: str) -> float:
    ingest = TwinIngest(db)
    evaluator = Evaluator(broker_url, [ingest], client_id=client_id)
    task = asyncio.create_task(evaluator.run())
    try:
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        return await timed_round(
            feed, lambda: evaluator.received, lambda: ingest.accepted + ingest.rejected, PER_ROUND
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


Login = tuple[str | None, str | None, str]


async def _storm(address: mqtt_url.BrokerAddress, logins: list[Login]) -> list[float]:
    """CONNECT latencies (seconds) of `logins` (username, password, client id)."""
    gate = asyncio.Semaphore(STORM_CONCURRENCY)
    latencies: list[float] = []

    async def one(username: str | None, password: str | None, client_id: str) -> None:
        login = replace(address, username=username, password=password)
        async with gate:
            start = time.perf_counter()
            async with aiomqtt.Client(
                **login.client_options(),
                identifier=client_id,
                clean_session=True,
            ):
                latencies.append(time.perf_counter() - start)

    async with asyncio.TaskGroup() as tasks:
        for login in logins:
            tasks.create_task(one(*login))
    return latencies


def _storm_line(name: str, latencies: list[float], wall: float, base: float | None) -> str:
    rate = len(latencies) / wall
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000
    ratio = f"  {rate / base:.0%} of anonymous" if base else ""
    return f"  {name:<40} {rate:7,.0f} connects/s  p99 {p99:6.0f} ms{ratio}"


async def _timed_storm(
    address: mqtt_url.BrokerAddress, logins: list[Login]
) -> tuple[list[float], float]:
    start = time.perf_counter()
    latencies = await _storm(address, logins)
    return latencies, time.perf_counter() - start


async def _issue_storm_credentials(db: Database, tenant: uuid.UUID) -> list[Login]:
    """STORM device credentials sharing one secret: hashing 1,000 of them
    would take the setup longer than the run; each is still checked with
    scrypt on its first CONNECT, since what is remembered is per username."""
    secret = hashing.new_secret()
    secret_hash = hashing.hash_secret(secret)
    logins: list[Login] = []
    rows = []
    for n in range(STORM):
        device, credential = f"STORM-{n:05d}", hashing.new_credential_id()
        rows.append((tenant, device, credential, secret_hash))
        logins.append(
            (device_username(tenant, device, credential), secret, device_client_id(tenant, device))
        )
    async with db.tenant(tenant) as con:
        await con.executemany(
            "INSERT INTO device_credentials (tenant_id, device_id, credential_id, secret_hash)"
            " VALUES ($1, $2, $3, $4)",
            rows,
        )
    return logins


async def main() -> None:
    async with scratch_database() as dsn:
        db = Database(await create_pool(dsn, size=10))
        open_broker = EmbeddedBroker()
        guarded = EmbeddedBroker(authenticator=Authenticator(db))
        try:
            open_url = await open_broker.start()
            guarded_address = await services.issue_address(
                db, "bench", mqtt_url.parse(await guarded.start())
            )
            await ingest_comparison(dsn, db, open_url, guarded_address.url)
            await connect_storm(dsn, db, mqtt_url.parse(open_url), guarded_address)
        finally:
            await guarded.stop()
            await open_broker.stop()
            await db.close()


async def ingest_comparison(dsn: str, db: Database, open_url: str, guarded_url: str) -> None:
    devices = [_ingest_device(k) for k in range(INGEST_DEVICES)]
    # A tenant per broker: each publisher counts its versions from the start.
    open_tenant = await seed_tenant(dsn, devices, desired_version=1_000_000)
    guarded_tenant = await seed_tenant(dsn, devices, desired_version=1_000_000)
    print(
        f"twin/reported ingest through the embedded broker, QoS 1, {INGEST_DEVICES} devices, "
        f"{PER_ROUND:,} messages a round, medians of {ROUNDS} rounds"
    )
    off, on = [], []
    async with (
        publisher(open_url, open_tenant) as open_feed,
        publisher(guarded_url, guarded_tenant) as guarded_feed,
    ):
        for n in range(ROUNDS):
            off.append(await _ingest_round(open_url, open_feed, db, f"bench-off-{n}"))
            on.append(await _ingest_round(guarded_url, guarded_feed, db, f"bench-on-{n}"))
    off_rate, on_rate = statistics.median(off), statistics.median(on)
    print(f"  {'access control off':<40} {off_rate:9,.0f}/s")
    print(f"  {'access control on':<40} {on_rate:9,.0f}/s  {on_rate / off_rate:.0%}")
    verdict = "met" if on_rate >= GOAL * off_rate else "NOT met"
    print(f"  on is {on_rate / off_rate:.0%} of off; goal >= {GOAL:.0%}: {verdict}")


async def connect_storm(
    dsn: str,
    db: Database,
    open_address: mqtt_url.BrokerAddress,
    guarded_address: mqtt_url.BrokerAddress,
) -> None:
    tenant = await seed_tenant(dsn, [f"STORM-{n:05d}" for n in range(STORM)])
    logins = await _issue_storm_credentials(db, tenant)
    anonymous: list[Login] = [(None, None, f"anon-{uuid.uuid4().hex[:12]}") for _ in range(STORM)]
    print(f"\nconnect storm: {STORM:,} CONNECTs, {STORM_CONCURRENCY} at a time")
    latencies, wall = await _timed_storm(open_address, anonymous)
    base = len(latencies) / wall
    print(_storm_line("anonymous, open broker", latencies, wall, None))
    latencies, wall = await _timed_storm(guarded_address, logins)
    print(_storm_line("device credentials, first CONNECT", latencies, wall, base))
    latencies, wall = await _timed_storm(guarded_address, logins)
    print(_storm_line("device credentials, reconnect", latencies, wall, base))


if __name__ == "__main__":
    run(main)
