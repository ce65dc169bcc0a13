"""PostgreSQL restarting under load: everything recovers by itself, nothing is
lost or doubled on the way.

What runs, all in this process but PostgreSQL: the test's own PostgreSQL
(tests/infra/own_postgres.py, stopped and started again on the same address),
the API server (`server.app.start`), a full evaluator
(`evaluator.service.running_evaluator`: liveness, twin ingest, outbox
publisher, retained repair), an embedded MQTT broker with access control,
and simulated devices connecting with credentials issued through the API.
The broker is the test's own rather than the session's `mqtt_url` one: the
embedded broker checks each CONNECT against the database the credential was
issued in, which here is the one being restarted (as in `pulse run`); the
session broker checks the session database, where these credentials do not
exist.

The load, before, during and after the outage (phases "stopping": pg_ctl
stop running, "down", "starting": pg_ctl start running, "after"): two devices
going offline (cleanly, or by cutting their connection so that the broker
sends the will) and online again; two steady ones heartbeating, which go
offline while the database is down (one of each kind); every device applying
and reporting desired state; a client writing desired state (UpdateDesired
and PatchDesired with the version it read), retrying on UNAVAILABLE; a client
reading; and four watch streams, WatchConnectionEvents and WatchTwin, each
once left open and once re-opened every HOP_S seconds from its last cursor
(as a client on a poor network would), so that resuming across the outage
is exercised whether or not an open stream breaks. A stream that breaks is
re-opened from its last cursor, as a client would: the typed client does not
do it itself.

What is proven, and why it matters:

- every RPC error, unary or stream, in every phase, is UNAVAILABLE (or
  DEADLINE_EXCEEDED: the client sets deadlines), never INTERNAL, UNKNOWN or
  anything else, and a stream never just ends: clients can tell "retry" from
  "bug". A write answered DATABASE_UNAVAILABLE must not have been written:
  its retry names the same expected_version, so had it been written the retry
  would conflict, and any conflict fails the test. A write answered
  OUTCOME_UNKNOWN (or past its deadline) is resolved by reading the twin
  back, as the API asks;
- afterwards, with nothing restarted, new calls succeed at once; a desired
  write reaches every simulated device and its report is stored (twin ingest
  and the outbox drain recovered); what the steady devices said while the
  database was down (an `offline`, a will) is stored as events once it is
  back, and devices going offline afterwards become events (the liveness
  flush recovered);
- the watch streams, reconnections included, delivered exactly the tenant's
  events in `connection_events`: the same event ids, none twice; WatchTwin
  delivered per device strictly increasing revisions, ending at the stored
  twin_revision;
- `connection_events` records no transition twice: ordered by event id
  (which, per device, is commit order: an event is inserted under its
  device_state row lock), each device's events form a chain, every event
  starting from the status the previous one ended in (UNKNOWN for the first)
  and changing it, and the last one ending in the stored status. A transition
  written twice would break the chain (two DISCONNECTED in a row, say).

Every wait is a poll with a deadline; no assertion is about timing. A failed
wait says what every actor was doing (`snapshot`).

Two weaknesses of the simulated devices (evaluator/simulator.py) are worked
around here, not hidden: a cancellation Python 3.11's asyncio.wait_for can
swallow (`settled`, `bring_up`), and a heartbeat a device may still send
after its clean `offline`, which rightly brings it back ONLINE (so the final
"goes offline" is a lost connection).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import asyncpg
import pulse_client as pc
import pytest
from pulse.device.v1 import connectivity_pb2

from evaluator.service import mqtt_broker, running_evaluator
from evaluator.simulator import SimulatedDevice
from server import config
from server.app import start
from server.auth import Role, mint_token
from server.db import Database, create_pool
from server.tenants import ensure_tenant
from tests.helpers import eventually, unique_id
from tests.infra.own_postgres import OwnPostgres, migrated_postgres

T = TypeVar("T")

log = logging.getLogger("tests.restart_under_load")

DEVICES = [f"RL-{n}" for n in range(1, 5)]
#: Go offline and online again all along.
FLAPPING = DEVICES[:2]
#: Stay online, but while the database is down, when one goes offline and
#: the other loses its connection.
STEADY = DEVICES[2:]
#: How long PostgreSQL stays down (besides the time pg_ctl takes).
OUTAGE_S = 3.0
#: The re-opening watchers' stream lifetime.
HOP_S = 0.7
#: The clients' default deadline for unary calls.
DEADLINE_S = 10.0
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
#: Reasons whose write may or may not have been committed.
UNKNOWN_OUTCOME = frozenset({"OUTCOME_UNKNOWN"})


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    async with migrated_postgres() as postgres:
        yield postgres


@dataclass
class Ledger:
    """Every RPC outcome of the test's clients, by phase of the restart."""

    phase: str = "before"
    ok: collections.Counter[str] = field(default_factory=collections.Counter)
    #: (phase, method, code, reason) -> count
    errors: collections.Counter[tuple[str, str, str, str]] = field(
        default_factory=collections.Counter
    )

    def succeeded(self) -> None:
        self.ok[self.phase] += 1

    def failed(self, method: str, error: pc.PulseError) -> None:
        self.errors[(self.phase, method, error.code.name, error.reason_name)] += 1

    def codes(self, *phases: str) -> collections.Counter[str]:
        """Errors by code, in `phases` (all if none named)."""
        out: collections.Counter[str] = collections.Counter()
        for (at, _, code, _), n in self.errors.items():
            if not phases or at in phases:
                out[code] += n
        return out


async def until_answered(ledger: Ledger, method: str, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` until it answers, retrying (with the typed client's backoff
    shape) on the retryable codes; any other error is recorded and raised."""
    policy = pc.RetryPolicy(initial_delay=0.05, max_delay=0.5)
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await call()
        except (pc.Unavailable, pc.DeadlineExceeded) as error:
            ledger.failed(method, error)
            await asyncio.sleep(policy.delay(attempt))
            continue
        except pc.PulseError as error:
            ledger.failed(method, error)
            raise
        ledger.succeeded()
        return result


@dataclass
class EventWatch:
    """A WatchConnectionEvents client that resumes from its last cursor
    whenever its stream ends; with `hop_s`, it also ends it every hop_s."""

    client: pc.AsyncPulseClient
    ledger: Ledger
    hop_s: float | None
    cursor: str = ""
    events: list[connectivity_pb2.ConnectionEvent] = field(default_factory=list)
    #: Streams opened, by phase.
    opened: collections.Counter[str] = field(default_factory=collections.Counter)
    live: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.events]

    async def run(self) -> None:
        failures = 0
        while True:
            self.opened[self.ledger.phase] += 1
            try:
                async with (
                    self.client.connectivity.watch(resume_cursor=self.cursor) as stream,
                    asyncio.timeout(self.hop_s),
                ):
                    async for message in stream:
                        if message.HasField("event"):
                            self.events.append(message.event)
                        else:
                            self.live.set()  # the first bookmark: the replay is over
                        self.cursor = message.cursor
                        failures = 0
                self.ledger.errors[(self.ledger.phase, "WatchConnectionEvents", "ENDED", "")] += 1
            except TimeoutError:
                continue  # a planned hop
            except pc.PulseError as error:
                self.ledger.failed("WatchConnectionEvents", error)
            failures += 1
            await asyncio.sleep(min(0.05 * 2**failures, 0.5))


@dataclass
class TwinWatch:
    """A WatchTwin client that resumes with the last revision of each device
    whenever its stream ends; with `hop_s`, it also ends it every hop_s."""

    client: pc.AsyncPulseClient
    ledger: Ledger
    hop_s: float | None
    revisions: dict[str, list[int]] = field(default_factory=dict)
    opened: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def last(self) -> dict[str, int]:
        return {device_id: seen[-1] for device_id, seen in self.revisions.items()}

    async def run(self) -> None:
        failures = 0
        while True:
            self.opened[self.ledger.phase] += 1
            try:
                async with (
                    self.client.twin.watch(DEVICES, resume_revisions=self.last) as stream,
                    asyncio.timeout(self.hop_s),
                ):
                    async for twin in stream:
                        self.revisions.setdefault(twin.device_id, []).append(twin.revision)
                        failures = 0
                self.ledger.errors[(self.ledger.phase, "WatchTwin", "ENDED", "")] += 1
            except TimeoutError:
                continue
            except pc.PulseError as error:
                self.ledger.failed("WatchTwin", error)
            failures += 1
            await asyncio.sleep(min(0.05 * 2**failures, 0.5))


@dataclass
class Writer:
    """Writes desired state to every device in turn, each write naming the
    version it last saw, retrying on UNAVAILABLE until the write is done."""

    client: pc.AsyncPulseClient
    ledger: Ledger
    versions: dict[str, int]
    #: (phase at commit, device, desired_version)
    committed: list[tuple[str, str, int]] = field(default_factory=list)
    #: Writes answered with an unknown outcome that had in fact committed.
    unknown_committed: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await self.write(DEVICES[n % len(DEVICES)], n)
            await asyncio.sleep(0.02)

    async def write(self, device_id: str, n: int) -> None:
        expected = self.versions[device_id]
        method = "PatchDesired" if n % 2 else "UpdateDesired"
        document: dict[str, pc.JsonValue] = {"setpoint": n, "mode": "eco" if n % 3 else "comfort"}
        policy = pc.RetryPolicy(initial_delay=0.05, max_delay=0.5)
        attempt = 0
        while True:
            attempt += 1
            try:
                if method == "PatchDesired":
                    twin = await self.client.twin.patch_desired(
                        device_id, document, expected_version=expected
                    )
                else:
                    twin = await self.client.twin.update_desired(
                        device_id, document, expected_version=expected
                    )
            except (pc.Unavailable, pc.DeadlineExceeded) as error:
                self.ledger.failed(method, error)
                unknown = (
                    isinstance(error, pc.DeadlineExceeded) or error.reason_name in UNKNOWN_OUTCOME
                )
                if unknown:
                    current = await until_answered(
                        self.ledger, "GetTwin", lambda: self.client.twin.get(device_id)
                    )
                    if current.desired_version == expected + 1:
                        assert pc.struct_to_dict(current.desired).get("setpoint") == n, current
                        self.unknown_committed += 1
                        twin = current
                        break
                    assert current.desired_version == expected, current
                await asyncio.sleep(policy.delay(attempt))
                continue
            except pc.PulseError as error:
                # VersionConflict included: this is the only writer, so a
                # conflict means a write answered "not written" was written.
                self.ledger.failed(method, error)
                current = await until_answered(
                    self.ledger, "GetTwin", lambda: self.client.twin.get(device_id)
                )
                self.versions[device_id] = current.desired_version
                return
            self.ledger.succeeded()
            break
        self.versions[device_id] = twin.desired_version
        self.committed.append((self.ledger.phase, device_id, twin.desired_version))


async def read_forever(client: pc.AsyncPulseClient, ledger: Ledger, stop: asyncio.Event) -> None:
    """A reader's mix of calls, each recorded (never retried)."""
    calls: list[tuple[str, Callable[[str], Awaitable[object]]]] = [
        ("GetDevice", client.devices.get),
        ("GetTwin", client.twin.get),
        (
            "ListConnectionEvents",
            lambda d: client.connectivity.list_page(
                connectivity_pb2.ListConnectionEventsRequest(device_id=d, page_size=5)
            ),
        ),
    ]
    n = 0
    while not stop.is_set():
        n += 1
        method, call = calls[n % len(calls)]
        try:
            await call(DEVICES[n % len(DEVICES)])
        except pc.PulseError as error:
            ledger.failed(method, error)
        else:
            ledger.succeeded()
        await asyncio.sleep(0.01)


@dataclass
class Flapper:
    """Takes a device offline (cleanly, or by cutting its connection so that
    the broker sends its will) and back online, again and again."""

    device: SimulatedDevice
    ledger: Ledger
    #: Times the device went down, by phase.
    downs: collections.Counter[str] = field(default_factory=collections.Counter)
    ups: collections.Counter[str] = field(default_factory=collections.Counter)

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await asyncio.sleep(0.3)
            if n % 2:
                await settled(self.device, self.device.stop)
            else:
                await settled(self.device, self.device.drop_connection)
            self.downs[self.ledger.phase] += 1
            await asyncio.sleep(0.3)
            await bring_up(self.device)
            self.ups[self.ledger.phase] += 1


async def settled(device: SimulatedDevice, action: Callable[[], Awaitable[None]]) -> None:
    """`await action()` (stop() or drop_connection()), which cancels the
    device's tasks and waits for them, re-cancelling whichever of them went
    on despite a cancellation.

    Python 3.11's asyncio.wait_for, which aiomqtt awaits every PUBACK and
    SUBACK with, returns normally when cancelled in the loop iteration its
    future completes in (CPython gh-86296; rewritten in 3.12). A simulated
    device's heartbeat or apply task cancelled just as its PUBACK arrived
    then keeps running, its TaskGroup waits for it, and stop() never returns
    (evaluator/simulator.py has no guard against it). Such a task still
    reports `cancelling()`, so it is found and cancelled again."""
    work = asyncio.ensure_future(action())
    async with asyncio.timeout(30):
        while not (await asyncio.wait({work}, timeout=0.5))[0]:
            for task in asyncio.all_tasks():
                frame = getattr(task.get_coro(), "cr_frame", None)
                if task.cancelling() and frame is not None and frame.f_locals.get("self") is device:
                    task.cancel()
    await work


async def bring_up(device: SimulatedDevice) -> None:
    """Connect the device; it retries by itself, backing off, while the
    broker refuses it (a CONNECT is checked in the database).

    The deadline is ours, shorter than start()'s own: when start() gives up
    it cancels the device's task, which the wait_for race of `settled` can
    leave running (it then goes on to a live connection), and start() would
    wait for it forever."""
    async with asyncio.timeout(30):
        await device.start(timeout=60.0)


@dataclass(frozen=True)
class StoredEvent:
    event_id: int
    device_id: str
    event_type: str
    previous_status: str
    status: str
    trigger: str
    occurred_at: datetime


async def stored_events(db: Database, tenant_id: uuid.UUID) -> list[StoredEvent]:
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch(
            "SELECT event_id, device_id, event_type, previous_status, status, trigger, occurred_at "
            "FROM connection_events WHERE tenant_id = $1 ORDER BY event_id",
            tenant_id,
        )
    return [StoredEvent(**dict(row.items())) for row in rows]


async def stored_state(db: Database, tenant_id: uuid.UUID) -> dict[str, asyncpg.Record]:
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id, status, twin_revision, desired_version, reported_version "
            "FROM device_state WHERE tenant_id = $1 AND device_id = ANY($2::text[])",
            tenant_id,
            DEVICES,
        )
    return {row["device_id"]: row for row in rows}


def chain_breaks(events: list[StoredEvent], final: dict[str, str]) -> list[str]:
    """Where a device's events, in id order, are not one chain of changes from
    UNKNOWN to its stored status."""
    status: dict[str, str] = {}
    breaks = []
    for event in events:
        before = status.get(event.device_id, "UNKNOWN")
        if event.previous_status != before or event.status == event.previous_status:
            breaks.append(
                f"event {event.event_id} of {event.device_id}: "
                f"{event.previous_status} -> {event.status} after {before}"
            )
        status[event.device_id] = event.status
    for device_id, stored in final.items():
        if status.get(device_id, "UNKNOWN") != stored:
            breaks.append(f"{device_id}: events end in {status.get(device_id)}, stored {stored}")
    return breaks


def _settings(data: Path) -> config.Settings:
    return config.load(
        {
            "PULSE_DATA_DIR": str(data),
            "PULSE_SECRET": secrets.token_hex(32),
            "PULSE_GRPC_PORT": "0",
            "PULSE_DB_POOL_SIZE": "8",
            "PULSE_EVALUATOR_ID": unique_id("restart-evaluator"),
            "PULSE_EVALUATOR_SESSION_EXPIRY_S": "60",
        }
    )


async def until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    what: str,
    state: Callable[[], object],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109
) -> None:
    """`eventually`, failing with `state()`: what the test's actors were doing."""
    try:
        await eventually(check, timeout=timeout, what=what)
    except pytest.fail.Exception:
        pytest.fail(f"{what} did not happen within {timeout}s; {state()}")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them, but never forever: a task that
    does not end is reported (with its stack) and left behind."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=10)
    for task in stuck:
        log.error("task %s did not end when cancelled: %s", task.get_name(), task.get_stack())


async def test_postgresql_restart_under_load(own_postgres: OwnPostgres, tmp_path: Path) -> None:
    postgres, url = own_postgres, own_postgres.url
    settings = _settings(tmp_path)
    tenant_id = uuid.uuid4()
    token = mint_token(
        settings.secret, tenant_id=tenant_id, role=Role.ADMIN, audience=settings.jwt_audience
    )
    ledger = Ledger()
    report: dict[str, object] = {}

    async with contextlib.AsyncExitStack() as stack:
        check_db = Database(await create_pool(url, size=2))
        stack.push_async_callback(check_db.close)
        async with check_db.admin() as con:
            await ensure_tenant(con, tenant_id, "restart under load")
        # The broker checks CONNECTs against the restarted database too.
        broker_db = Database(await create_pool(url, size=2))
        stack.push_async_callback(broker_db.close)
        broker_url = await stack.enter_async_context(
            mqtt_broker(None, broker_db, service="evaluator")
        )
        server = await start(settings, url)
        stack.push_async_callback(server.stop, 1.0)
        evaluator = await stack.enter_async_context(running_evaluator(settings, url, broker_url))
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        client = await pc.AsyncPulseClient.connect(
            f"127.0.0.1:{server.port}", token=token, timeout=DEADLINE_S
        )
        stack.push_async_callback(client.close)

        sims: dict[str, SimulatedDevice] = {}
        for device_id in DEVICES:
            await client.devices.create(device_id)
            credential = await client.devices.create_credential(device_id)
            sims[device_id] = SimulatedDevice(
                broker_url,
                tenant_id,
                device_id,
                credential=(credential.username, credential.secret),
                heartbeat_s=0.3,
                apply_delay_s=0.05,
            )

        async def stop_devices() -> None:
            for sim in sims.values():
                await settled(sim, sim.stop)

        stack.push_async_callback(stop_devices)
        background: list[asyncio.Task[None]] = []
        stack.push_async_callback(_cancel, background)

        # Watchers first, live before any device connects: every event of
        # the tenant is then one they must deliver.
        event_watches = [EventWatch(client, ledger, None), EventWatch(client, ledger, HOP_S)]
        twin_watches = [TwinWatch(client, ledger, None), TwinWatch(client, ledger, HOP_S)]
        background += [asyncio.create_task(w.run()) for w in event_watches]
        background += [asyncio.create_task(w.run()) for w in twin_watches]
        await eventually(
            lambda: (
                all(w.live.is_set() for w in event_watches)
                and all(len(w.revisions) == len(DEVICES) for w in twin_watches)
            ),
            what="the watch streams going live",
        )
        for sim in sims.values():
            await bring_up(sim)

        stop_load = asyncio.Event()
        stack.callback(stop_load.set)
        writer = Writer(client, ledger, dict.fromkeys(DEVICES, 0))
        flappers = [Flapper(sims[d], ledger) for d in FLAPPING]
        load = [
            asyncio.create_task(writer.run(stop_load)),
            asyncio.create_task(read_forever(client, ledger, stop_load)),
            *(asyncio.create_task(f.run(stop_load)) for f in flappers),
        ]
        background += load
        events: list[StoredEvent] = []

        def snapshot() -> dict[str, object]:
            """What the actors are doing, for a wait that fails."""
            return {
                "phase": ledger.phase,
                "flaps (downs, ups)": [(dict(f.downs), dict(f.ups)) for f in flappers],
                "connected": {d: sim.connected.is_set() for d, sim in sims.items()},
                "load ended": {
                    t.get_name(): "cancelled" if t.cancelled() else t.exception()
                    for t in load
                    if t.done()
                },
                "writes": collections.Counter(phase for phase, _, _ in writer.committed),
                "errors": ledger.codes(),
                "evaluator received, unacknowledged": (
                    evaluator.received,
                    evaluator.unacknowledged,
                ),
                "events read last": [
                    (e.event_id, e.device_id, e.event_type, e.trigger) for e in events
                ],
            }

        async def read_events() -> list[StoredEvent]:
            events[:] = await stored_events(check_db, tenant_id)
            return events

        # The load is under way: writes commit, devices connect and flap.
        await until(
            lambda: len(writer.committed) >= 8, what="desired writes before", state=snapshot
        )
        await until(
            lambda: all(f.ups["before"] >= 1 for f in flappers),
            what="flaps before the outage",
            state=snapshot,
        )

        # The outage: pg_ctl stop (sessions ended), down, pg_ctl start.
        ledger.phase = "stopping"
        log.info("phase: stopping")
        stopping = time.monotonic()
        await postgres.stop()
        ledger.phase = "down"
        log.info("phase: down")
        down, down_from = time.monotonic(), datetime.now(UTC)
        # The steady devices go offline while the database is down, one
        # saying so and one by losing its connection (the broker sends its
        # will): neither needs the database, both must become events later.
        await settled(sims[STEADY[0]], sims[STEADY[0]].stop)
        await settled(sims[STEADY[1]], sims[STEADY[1]].drop_connection)
        await until(
            lambda: ledger.codes("down")["UNAVAILABLE"] >= 3,
            what="calls failing while down",
            state=snapshot,
        )
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        ledger.phase = "starting"
        log.info("phase: starting")
        starting, down_to = time.monotonic(), datetime.now(UTC)
        assert await postgres.start() == url
        ledger.phase = "after"
        log.info("phase: after")
        up = time.monotonic()
        report["pg_ctl stop s"] = round(down - stopping, 2)
        report["database down s (pg_ctl stop done to pg_ctl start run)"] = round(starting - down, 2)
        report["pg_ctl start s"] = round(up - starting, 2)

        # Recovery under the same load, nothing restarted. What the steady
        # devices said while the database was down is stored once it is back.
        def outage_events() -> set[tuple[str, str]]:
            return {
                (e.device_id, e.event_type)
                for e in events
                if e.device_id in STEADY and down_from <= e.occurred_at <= down_to
            }

        async def outage_stored() -> bool:
            await read_events()
            # (A heartbeat the stopping device sent after its `offline` may
            # add a CONNECTED: see the final stage.)
            return outage_events() >= {(STEADY[0], "DISCONNECTED"), (STEADY[1], "CONNECTION_LOST")}

        await until(outage_stored, timeout=30, what="the outage's events stored", state=snapshot)
        for device_id in STEADY:
            await bring_up(sims[device_id])
        await until(
            lambda: sum(phase == "after" for phase, _, _ in writer.committed) >= 8,
            timeout=30,
            what="desired writes after the restart",
            state=snapshot,
        )
        await until(
            lambda: all(f.ups["after"] >= 2 for f in flappers),
            timeout=30,
            what="devices reconnecting after the restart",
            state=snapshot,
        )
        stop_load.set()
        await until(lambda: all(t.done() for t in load), what="the load stopping", state=snapshot)
        await asyncio.gather(*load)  # raises what a load task may have raised
        ledger.phase = "final"
        log.info("phase: final")

        # New calls succeed at once: none of these is retried.
        await client.devices.create("RL-AFTER")
        assert (await client.devices.get("RL-AFTER")).device_id == "RL-AFTER"
        await client.connectivity.list_page(
            connectivity_pb2.ListConnectionEventsRequest(device_id=DEVICES[0], page_size=5)
        )
        # A desired write reaches every device, and its report is stored.
        final: dict[str, int] = {}
        for device_id in DEVICES:
            twin = await client.twin.update_desired(
                device_id, {"final": True}, expected_version=writer.versions[device_id]
            )
            final[device_id] = twin.desired_version
        for device_id, version in final.items():
            await sims[device_id].wait_for_version(version, timeout=15)
            assert sims[device_id].state == {"final": True}

        async def reports_stored() -> bool:
            twins = [await client.twin.get(d) for d in DEVICES]
            return all(t.reported_version == final[t.device_id] for t in twins)

        await until(reports_stored, what="the final reports stored", state=snapshot)

        # Every device goes offline, and each of them gets its event. By
        # losing its connection: after a clean stop() a simulated device may
        # still send a heartbeat, which rightly brings it back ONLINE.
        async def statuses_are(status: str) -> bool:
            state = await stored_state(check_db, tenant_id)
            return {state[d]["status"] for d in DEVICES} == {status}

        await until(lambda: statuses_are("ONLINE"), what="every device ONLINE", state=snapshot)
        events_before = len(await read_events())
        for sim in sims.values():
            await settled(sim, sim.drop_connection)
        await until(lambda: statuses_are("OFFLINE"), what="every device OFFLINE", state=snapshot)
        await read_events()
        assert sorted((e.device_id, e.trigger) for e in events[events_before:]) == [
            (d, "last_will") for d in DEVICES
        ], snapshot()

        # The watch streams catch up with the database.
        stored_ids = [e.event_id for e in events]
        await until(
            lambda: all(set(w.ids) >= set(stored_ids) for w in event_watches),
            timeout=20,
            what="the event streams catching up",
            state=snapshot,
        )
        state = await stored_state(check_db, tenant_id)
        stored_revisions = {d: state[d]["twin_revision"] for d in DEVICES}
        await until(
            lambda: all(w.last == stored_revisions for w in twin_watches),
            timeout=20,
            what="the twin streams reaching the stored revisions",
            state=snapshot,
        )
        await _cancel(background)

        report["rpc ok by phase"] = dict(ledger.ok)
        report["rpc errors by (phase, method, code, reason)"] = dict(ledger.errors)
        report["writes committed by phase"] = dict(
            collections.Counter(phase for phase, _, _ in writer.committed)
        )
        report["writes with unknown outcome that had committed"] = writer.unknown_committed
        report["events stored"] = len(events)
        report["events by trigger"] = dict(collections.Counter(e.trigger for e in events))
        report["steady devices' events from while the database was down"] = outage_events()
        report["event streams opened by phase"] = [dict(w.opened) for w in event_watches]
        report["twin streams opened by phase"] = [dict(w.opened) for w in twin_watches]
        report["twins received"] = [sum(map(len, w.revisions.values())) for w in twin_watches]
        print("\nrestart under load:", *(f"  {k}: {v}" for k, v in report.items()), sep="\n")

        # Errors: only retryable codes, and the outage did produce them.
        assert set(ledger.codes()) <= RETRYABLE, ledger.errors
        assert ledger.codes("down")["UNAVAILABLE"] > 0, ledger.errors
        # The streams: exactly the stored events, none twice, none missing.
        for watch in event_watches:
            assert len(watch.ids) == len(set(watch.ids)), "an event delivered twice"
            assert sorted(watch.ids) == stored_ids
            assert {
                e.id: (e.device_id, connectivity_pb2.ConnectionEventType.Name(e.event_type))
                for e in watch.events
            } == {e.event_id: (e.device_id, e.event_type) for e in events}
        # Streams re-opened while the database was down resumed from their cursors.
        for hopper in (event_watches[1], twin_watches[1]):
            assert hopper.opened["down"] >= 1 and hopper.opened["after"] >= 1, hopper.opened
        for twins in twin_watches:
            for device_id, revisions in twins.revisions.items():
                assert all(a < b for a, b in itertools.pairwise(revisions)), (device_id, revisions)
            assert twins.last == stored_revisions
        # The log: one chain of changes per device, ending in the stored status.
        final_status = {d: state[d]["status"] for d in DEVICES}
        assert chain_breaks(events, final_status) == []
