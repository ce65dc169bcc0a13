"""Rollouts at fleet scale: the engine's desired writes beside a plain loop
of the same writes, the time until a whole fleet has acknowledged, and the
accuracy of the rate limit.

One tenant with --devices devices (default 100,000), loaded with
bench/groups.py's `build` (random ids, tags, sites; every device active, no
liveness status, so the evaluator's sweep has nothing to mark stale while
it runs). In one run:

  1. Baseline: `server.twin.store.write_desired` in a loop over the fleet,
     the way the engine writes: one connection, one tenant transaction
     (`Database.tenant`) per 500 devices in device_id order, each write a
     small merge patch applied to the document last written, on the version
     last written. Writes/s, the median of --rounds rounds: all but the
     last before the rollout, the last after it, each over the whole fleet
     (the outbox rows they queue are deleted and the tables vacuumed after
     every round, outside the timing).
  2. The engine: a private Mosquitto on a free port (as `pulse broker-config
     mosquitto` sets it up, holding the evaluator's retained marker as a
     broker in service does, so the evaluator does not start by
     republishing every desired document), `pulse evaluator` and
     `pulse rollouts` (the engine, default tuning) in subprocesses on it
     and on the scratch database, and a device
     simulator in this process: two MQTT connections sharing one
     subscription to every `twin/desired` topic, answering each desired
     message with the reported message acknowledging it (`{"state":
     <desired>, "desired_version": n}`, QoS 1), as a device that applies
     everything at once would. Then a rollout over the whole fleet
     (`rollouts.store.create`: target_filter {}, no rate limit, patch
     {"firmware": {"target": "2.0"}}), created by this process.
     Engine writes/s: the devices written, from the start of the first
     tick that wrote (its transaction's now(), the devices' applied_at) to
     the commit of the last (polled every 50 ms on the database's clock);
     the wait for the first tick (the engine's idle poll) is printed
     apart. Goal (the issue): >= 0.70 of the baseline. Also the time until
     every device is SUCCEEDED, from the creation (enrolling the fleet
     included), the ticks (from the distinct applied_at values: one per
     tick that wrote), each device's time from its write to its outcome,
     and the cores each process used meanwhile.
  3. Rate accuracy: a second tenant with enough new devices for
     --rate-seconds (default 60) at max_per_minute 6,000, a rollout over
     them, cancelled once the window is over; devices started per minute,
     from their applied_at, against 6,000, and the most started in any 60
     seconds (the rules allow max_per_minute + 1).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python -m bench.rollouts [--devices 100000] [--rate-seconds 60] [--rounds 3]

Without DATABASE_URL, an embedded PostgreSQL. Needs the mosquitto binary
(apt-get install mosquitto). Nothing listens on the usual ports: the broker
takes a free one, and the scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.groups import build
from bench.harness import ROOT, free_port, listening, run, scratch_database, seed_tenant
from bench.ingest import Cpu
from bench.watch import _percentile
from evaluator.retained_repair import MARKER_TOPIC
from server import filters, wire
from server.db import Connection, Database, create_pool
from server.rollouts import rules, store
from server.rollouts.engine import Tuning
from server.twin import store as twin_store
from server.twin.merge_patch import apply_merge_patch

DEVICES = 100_000
BATCH = Tuning().start_batch  # devices per engine transaction, and per baseline one
PATCH: dict[str, Any] = {"firmware": {"target": "2.0"}}
GOAL = 0.70
RATE = 6_000  # devices per minute
RATE_SECONDS = 60.0
# New devices beyond what the rate window can start, so that it never runs dry.
RATE_SPARE_S = 15.0
ROUNDS = 3
SIM_CONNECTIONS = 2
POLL_S = 0.05
SAMPLE_S = 0.2
# No progress for this long: something is broken (the evaluator's log says what).
STALL_S = 60.0


def _cells(values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    """median, p90, p99, max."""
    if not values:
        return "-"
    parts = [
        f"median {statistics.median(values) * scale:.2f}",
        f"p90 {_percentile(values, 0.9) * scale:.2f}",
        f"p99 {_percentile(values, 0.99) * scale:.2f}",
        f"max {max(values) * scale:.2f}",
    ]
    return ", ".join(parts) + f" {unit}"


# -- the broker, the evaluator and the simulated devices -----------------------


class Mosquitto:
    """A Mosquitto of this run's own on a free port, as `pulse broker-config
    mosquitto` sets up the queue (tests/faults/conftest.py starts it the
    same way)."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 1000000",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            # As root it would switch to the `mosquitto` user, who cannot
            # write the log in this folder.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.binary = binary
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if not await listening(self.port, self.process):
            raise RuntimeError(f"mosquitto did not start: {self._log_tail()}")
        # A broker in service: the evaluator finds its marker and does not
        # requeue every desired document (evaluator/retained_repair.py).
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-marker") as client:
            await client.publish(MARKER_TOPIC, b'{"set_by": "bench/rollouts"}', qos=1, retain=True)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    async def stop(self) -> None:
        await _end(self.process)


async def _end(process: asyncio.subprocess.Process | None) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 15 s."""
    if process is None or process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()


class PulseProcess:
    """`pulse <command>` (evaluator, rollouts) on the scratch database and
    the private broker, with nothing of the caller's configuration (PULSE_*,
    MQTT_URL) but its defaults; its log goes to a file. Started once its log
    says `ready`."""

    def __init__(self, command: str, ready: str, dsn: str, mqtt_url: str, folder: Path) -> None:
        self.command = command
        self.ready = ready
        self.log = folder / f"{command}.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PULSE_") and k not in ("DATABASE_URL", "MQTT_URL")
        }
        data = folder / f"pulse-data-{command}"
        data.mkdir()
        self.env.update(
            DATABASE_URL=dsn,
            MQTT_URL=mqtt_url,
            PULSE_EVALUATOR_ID=f"bench-rollouts-{uuid.uuid4().hex[:8]}",
            PULSE_DATA_DIR=str(data),
            PULSE_SECRET=secrets.token_hex(32),
            PULSE_LOG_LEVEL="INFO",
        )
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self) -> None:
        script = Path(sys.executable).parent / "pulse"
        command = (
            [str(script), self.command]
            if script.exists()
            else [sys.executable, "-c", "from launcher.cli import main; main()", self.command]
        )
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while self.ready not in self.log_text():
            if not self.alive() or time.monotonic() > deadline:
                tail = self.log_text()[-4000:]
                raise RuntimeError(f"pulse {self.command} did not start:\n{tail}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await _end(self.process)

    def warnings(self) -> collections.Counter[str]:
        """Its warnings and errors, numbers masked, by how often each was logged."""
        found: collections.Counter[str] = collections.Counter()
        for line in self.log_text().splitlines():
            for level in (" WARNING ", " ERROR ", " CRITICAL "):
                if level in line:
                    found[re.sub(r"\d+", "N", level.strip() + " " + line.split(level, 1)[1])] += 1
        return found


class Devices:
    """The fleet's stand-in: a few MQTT connections sharing one
    subscription to every device's `twin/desired`, each answering what it
    receives with the reported message acknowledging it, on the device's
    `twin/reported` (paho's network threads; the answers are QoS 1, and the
    evaluator acknowledges them only once stored)."""

    def __init__(self, port: int, connections: int = SIM_CONNECTIONS) -> None:
        self.port = port
        self.clients: list[mqtt.Client] = []
        self.answered = [0] * connections
        self._subscribed = [threading.Event() for _ in range(connections)]

    @property
    def total(self) -> int:
        return sum(self.answered)

    def start(self) -> None:
        share = f"$share/bench-devices/{wire.PREFIX}/+/+/twin/desired"
        for index in range(len(self.answered)):
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"bench-devices-{index}-{uuid.uuid4().hex[:6]}",
                protocol=mqtt.MQTTv5,
            )
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.on_message = self._answerer(index)
            subscribed = self._subscribed[index]

            def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any, s: str = share) -> None:
                c.subscribe(s, qos=1)

            def on_subscribe(
                c: mqtt.Client, u: Any, mid: Any, rc: Any, p: Any, e: threading.Event = subscribed
            ) -> None:
                e.set()

            client.on_connect = on_connect
            client.on_subscribe = on_subscribe
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = 1000
            client.connect("127.0.0.1", self.port, clean_start=True, properties=properties)
            client.loop_start()
            self.clients.append(client)
        for event in self._subscribed:
            if not event.wait(10):
                raise RuntimeError("the simulated devices did not subscribe")

    def _answerer(self, index: int) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            tenant, device_id = message.topic.split("/")[1:3]
            state, version = wire.parse_desired(bytes(message.payload))
            topic = f"{wire.PREFIX}/{tenant}/{device_id}/twin/reported"
            client.publish(topic, wire.reported(state, version), qos=1)
            self.answered[index] += 1

        return on_message

    def stop(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


# -- cores used ----------------------------------------------------------------


class Usage:
    """Cores used over a phase (Linux /proc; nothing elsewhere): the
    machine's, `fixed` processes', and those of this database's PostgreSQL
    backends, which are sampled every SAMPLE_S rather than read at the
    ends: asyncpg's pool replaces a connection after 50,000 queries
    (`max_queries`), and a backend that has exited is gone from /proc, so
    each counts what it had used when last seen."""

    def __init__(self, db: Database, fixed: dict[str, list[int]]) -> None:
        self._db = db
        self._fixed = fixed
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._cpu = Cpu(fixed)
        self._t0 = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    async def _backends(self) -> list[int]:
        async with self._db.admin() as con:
            rows = await con.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        return [r["pid"] for r in rows]

    def _see(self, pids: list[int], *, before: bool = False) -> None:
        for pid in pids:
            ticks = Cpu._process(pid)
            if ticks is None:
                continue
            # A backend that started during the phase used nothing before it.
            self._first.setdefault(pid, ticks if before else 0)
            self._last[pid] = ticks

    async def start(self) -> Usage:
        self._see(await self._backends(), before=True)
        self._cpu = Cpu(self._fixed)
        self._t0 = time.perf_counter()
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            self._see(await self._backends())

    async def stop(self) -> dict[str, float]:
        """{"machine": cores busy, each fixed group's, "postgres", "other":
        the rest of the machine's}; empty without /proc."""
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._see(await self._backends())
        elapsed = time.perf_counter() - self._t0
        shares = self._cpu.stop(self._fixed)
        if "machine" not in shares:
            return {}
        used = sum(self._last[pid] - self._first[pid] for pid in self._last)
        shares["postgres"] = used / os.sysconf("SC_CLK_TCK") / elapsed
        named = sum(v for k, v in shares.items() if k not in ("machine", "other"))
        shares["other"] = max(0.0, shares["machine"] - named)
        return shares


# -- the baseline --------------------------------------------------------------


async def baseline_round(
    db: Database,
    tenant: uuid.UUID,
    ids: list[str],
    twins: dict[str, tuple[dict[str, Any], int]],
    n: int,
) -> float:
    """Writes/s of one pass over `ids` (sorted), as the engine writes them;
    `twins` holds each device's desired document and version, and is kept
    up to date."""
    patch: dict[str, Any] = {"bench": {"round": n}}
    t0 = time.perf_counter()
    for i in range(0, len(ids), BATCH):
        async with db.tenant(tenant) as con:
            for device_id in ids[i : i + BATCH]:
                desired, version = twins[device_id]
                merged = apply_merge_patch(desired, patch)
                assert isinstance(merged, dict)
                record = await twin_store.write_desired(
                    con, tenant, device_id, merged, expected_version=version
                )
                twins[device_id] = (record.desired, record.desired_version)
    return len(ids) / (time.perf_counter() - t0)


async def _settle_tables(db: Database) -> None:
    """What the publisher and autovacuum would do between two phases: the
    queued publications gone, dead rows reclaimed, statistics current."""
    async with db.admin() as con:
        await con.execute("DELETE FROM twin_outbox")
        await con.execute("VACUUM ANALYZE device_state, twin_outbox, devices")


async def _refresh_twins(db: Database, tenant: uuid.UUID) -> dict[str, tuple[dict[str, Any], int]]:
    async with db.tenant(tenant, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id, desired, desired_version FROM device_state WHERE tenant_id = $1",
            tenant,
        )
    return {r["device_id"]: (r["desired"], r["desired_version"]) for r in rows}


# -- following a rollout -------------------------------------------------------


def _new_rollout(rollout_id: str, max_per_minute: int) -> store.NewRollout:
    return store.NewRollout(
        rollout_id=rollout_id,
        description="bench/rollouts",
        target_group_id=None,
        target_filter=filters.canonical_json(filters.parse_filter({})),
        patch=PATCH,
        max_per_minute=max_per_minute,
        canary_count=0,
        device_timeout=timedelta(minutes=15),
        abort_threshold_percent=None,
        abort_min_count=1,
        failure_path="",
        continuous=False,
        created_by="bench",
    )


async def create_rollout(
    db: Database, tenant: uuid.UUID, rollout_id: str, max_per_minute: int
) -> store.RolloutRecord:
    async with db.tenant(tenant) as con:
        return await store.create(
            con,
            tenant,
            _new_rollout(rollout_id, max_per_minute),
            stale_after=filters.DEFAULT_TWIN_STALE_AFTER,
        )


_PROGRESS = """
    SELECT clock_timestamp() AS now, state, pending, applied, succeeded, failed, timed_out,
           skipped, superseded
    FROM rollouts WHERE tenant_id = $1 AND rollout_id = $2
"""


@dataclass
class Followed:
    #: Database time when `pending` was first seen 0 (the last start committed).
    all_started: datetime | None = None
    #: Database time when the rollout was first seen ended.
    ended: datetime | None = None
    state: str = ""
    #: The most devices seen APPLIED (written, not yet judged) at once.
    peak_applied: int = 0


async def follow(
    con: Connection,
    tenant: uuid.UUID,
    rollout_id: str,
    processes: list[PulseProcess],
    *,
    until: datetime | None = None,
) -> Followed:
    """Poll the rollout until it ends (or, with `until`, until the
    database's clock passes it); fails when nothing moves for STALL_S."""
    followed = Followed()
    last: tuple[int, ...] = ()
    moved = time.monotonic()
    while True:
        row = await con.fetchrow(_PROGRESS, tenant, rollout_id)
        assert row is not None
        followed.state = row["state"]
        followed.peak_applied = max(followed.peak_applied, row["applied"])
        if followed.all_started is None and row["pending"] == 0:
            followed.all_started = row["now"]
        if row["state"] != rules.RUNNING or (until is not None and row["now"] >= until):
            followed.ended = row["now"]
            return followed
        progress = tuple(row[k] for k in ("pending", "applied", "succeeded"))
        if progress != last:
            last, moved = progress, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            logs = "".join(f"\npulse {p.command}: {p.log_text()[-3000:]}" for p in processes)
            raise RuntimeError(
                f"rollout {rollout_id}: no progress for {STALL_S:.0f} s at {dict(row.items())}; "
                f"the logs end:{logs}"
            )
        for process in processes:
            if not process.alive():
                raise RuntimeError(f"pulse {process.command} exited:\n{process.log_text()[-4000:]}")
        await asyncio.sleep(POLL_S)


@dataclass
class Ticks:
    """The ticks that started devices, from the devices' applied_at (each
    tick's transaction time)."""

    at: list[datetime] = field(default_factory=list)
    started: list[int] = field(default_factory=list)

    @property
    def intervals(self) -> list[float]:
        return [(b - a).total_seconds() for a, b in itertools.pairwise(self.at)]


async def ticks(con: Connection, tenant: uuid.UUID, rollout_id: str) -> Ticks:
    rows = await con.fetch(
        """
        SELECT applied_at, count(*) AS n FROM rollout_devices
        WHERE tenant_id = $1 AND rollout_id = $2 AND applied_at IS NOT NULL
        GROUP BY applied_at ORDER BY applied_at
        """,
        tenant,
        rollout_id,
    )
    return Ticks([r["applied_at"] for r in rows], [r["n"] for r in rows])


# -- the phases ----------------------------------------------------------------


@dataclass
class EngineResult:
    devices: int
    enrol_s: float
    first_wait_s: float
    writes_per_s: float
    written: int
    succeeded: int
    states: dict[str, int]
    all_started_s: float
    all_succeeded_s: float | None
    state: str
    ticks: Ticks
    outcome_s: list[float]
    cpu: dict[str, float]
    answered: int
    peak_applied: int


async def engine_phase(
    db: Database,
    tenant: uuid.UUID,
    devices: int,
    processes: list[PulseProcess],
    sim: Devices,
    fixed: dict[str, list[int]],
) -> EngineResult:
    rollout_id = "fleet-firmware-2-0"
    usage = await Usage(db, fixed).start()
    answered0 = sim.total
    t0 = time.perf_counter()
    created = await create_rollout(db, tenant, rollout_id, 0)
    enrol_s = time.perf_counter() - t0
    assert created.counts.pending == devices, created.counts
    async with db.admin() as con:
        followed = await follow(con, tenant, rollout_id, processes)
        shares = await usage.stop()
        record = await store.get(con, tenant, rollout_id)
        found = await ticks(con, tenant, rollout_id)
        states = {
            r["state"]: r["n"]
            for r in await con.fetch(
                "SELECT state, count(*) AS n FROM rollout_devices "
                "WHERE tenant_id = $1 AND rollout_id = $2 GROUP BY state",
                tenant,
                rollout_id,
            )
        }
        outcome = [
            r["s"]
            for r in await con.fetch(
                "SELECT extract(epoch FROM ended_at - applied_at)::float8 AS s "
                "FROM rollout_devices WHERE tenant_id = $1 AND rollout_id = $2 "
                "AND ended_at IS NOT NULL AND applied_at IS NOT NULL",
                tenant,
                rollout_id,
            )
        ]
        # Started with a write (not "already held"): the engine's desired writes.
        written = await con.fetchval(
            "SELECT count(*) FROM rollout_devices WHERE tenant_id = $1 AND rollout_id = $2 "
            "AND applied_at IS NOT NULL AND detail NOT LIKE 'the desired state already held%'",
            tenant,
            rollout_id,
        )
    assert followed.all_started is not None and found.at
    first, created_at = found.at[0], record.created_at
    span = (followed.all_started - first).total_seconds()
    done = record.ended_at if record.state == rules.DONE else None
    return EngineResult(
        devices=devices,
        enrol_s=enrol_s,
        first_wait_s=(first - created_at).total_seconds() - enrol_s,
        writes_per_s=written / span,
        written=written,
        succeeded=states.get(rules.SUCCEEDED, 0),
        states=states,
        all_started_s=(followed.all_started - created_at).total_seconds(),
        all_succeeded_s=(done - created_at).total_seconds() if done else None,
        state=record.state,
        ticks=found,
        outcome_s=outcome,
        cpu=shares,
        answered=sim.total - answered0,
        peak_applied=followed.peak_applied,
    )


@dataclass
class RateResult:
    devices: int
    window_s: float
    started: int
    per_minute: float
    first_wait_s: float
    tick_intervals: list[float]
    windows_10s: list[float]
    max_in_60s: int
    cpu: dict[str, float]


async def rate_phase(
    dsn: str,
    db: Database,
    processes: list[PulseProcess],
    seconds: float,
    fixed: dict[str, list[int]],
) -> RateResult:
    devices = math.ceil(RATE * (seconds + RATE_SPARE_S) / 60)
    tenant = await seed_tenant(dsn, [f"RATE-{n:06d}" for n in range(devices)])
    async with db.admin() as con:
        await con.execute("ANALYZE devices, device_state")
    rollout_id = "rate-6000"
    created = await create_rollout(db, tenant, rollout_id, RATE)
    usage = await Usage(db, fixed).start()
    async with db.admin() as con:
        # The window starts where the rate's count does: at rate_since.
        until = created.rate_since + timedelta(seconds=seconds)
        await follow(con, tenant, rollout_id, processes, until=until)
    shares = await usage.stop()
    async with db.tenant(tenant) as con:
        await store.change_state(
            con,
            tenant,
            rollout_id,
            allowed_from=frozenset({rules.RUNNING}),
            to=rules.CANCELLED,
            reason="the bench's window is over",
            wanted="the rate phase ran dry",
        )
    async with db.admin() as con:
        found = await ticks(con, tenant, rollout_id)
    # Only ticks inside the window: one may have committed between its end
    # and the cancel.
    inside = [(at, n) for at, n in zip(found.at, found.started, strict=True) if at <= until]
    at = [a for a, _ in inside]
    counts = [n for _, n in inside]
    started = sum(counts)
    # From the first tick: the devices started after it, over the time since.
    span = (at[-1] - at[0]).total_seconds()
    per_minute = (started - counts[0]) / span * 60 if span > 0 else 0.0
    windows: list[float] = []
    edge = at[0]
    while edge + timedelta(seconds=10) <= at[-1]:
        end = edge + timedelta(seconds=10)
        windows.append(sum(n for a, n in inside if edge < a <= end) * 6.0)
        edge = end
    # The most started in any 60 s (from a tick on): the rules allow RATE + 1.
    max_in_60s, j, running = 0, 0, 0
    for i in range(len(at)):
        while j < len(at) and at[j] < at[i] + timedelta(seconds=60):
            running += counts[j]
            j += 1
        max_in_60s = max(max_in_60s, running)
        running -= counts[i]
    return RateResult(
        devices=devices,
        window_s=seconds,
        started=started,
        per_minute=per_minute,
        first_wait_s=(at[0] - created.rate_since).total_seconds(),
        tick_intervals=[(b - a).total_seconds() for a, b in itertools.pairwise(at)],
        windows_10s=windows,
        max_in_60s=max_in_60s,
        cpu=shares,
    )


# -- the run -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def services(
    dsn: str, binary: str
) -> AsyncIterator[tuple[Mosquitto, list[PulseProcess], Devices]]:
    """The private broker, the simulated devices, `pulse evaluator` and
    `pulse rollouts`, for the block."""
    folder = Path(tempfile.mkdtemp(prefix="pulse-bench-rollouts-"))
    broker = Mosquitto(binary, folder)
    processes = [
        PulseProcess("evaluator", "evaluator connected to", dsn, broker.url, folder),
        PulseProcess("rollouts", "rollout engine running", dsn, broker.url, folder),
    ]
    sim = Devices(broker.port)
    try:
        await broker.start()
        await asyncio.to_thread(sim.start)
        for process in processes:
            await process.start()
        yield broker, processes, sim
    finally:
        for process in processes:
            await process.stop()
        await asyncio.to_thread(sim.stop)
        await broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _cpu_line(shares: dict[str, float]) -> str:
    if "machine" not in shares:
        return "(no /proc)"
    names = [n for n in shares if n not in ("machine", "other")]
    parts = [f"{n} {shares[n]:.2f}" for n in [*names, "other"]]
    return f"{shares['machine']:.2f} of {os.cpu_count()} = " + " + ".join(parts)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=DEVICES, help="in the rollout")
    parser.add_argument(
        "--rate-seconds", type=float, default=RATE_SECONDS, help="of the 6,000/min rollout"
    )
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="of the baseline (the last after the rollout)"
    )
    args = parser.parse_args()
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if binary is None:
        print(
            "rollouts: skipped, the mosquitto binary is not installed (apt-get install mosquitto)"
        )
        return
    n: int = args.devices
    started = time.perf_counter()
    async with scratch_database() as dsn:
        tenant = uuid.uuid4()
        t0 = time.perf_counter()
        fleet = await build(
            dsn,
            tenant,
            n,
            # No liveness status: nothing for the evaluator's sweep to mark stale.
            states=lambda rows: [row[:2] for row in rows],
            state_columns=("tenant_id", "device_id"),
        )
        # A connection each for following a rollout, sampling backends, the rest.
        db = Database(await create_pool(dsn, size=3))
        try:
            async with db.admin() as con:
                # The whole fleet active: the rollout is of `n` devices.
                await con.execute(
                    "UPDATE devices SET lifecycle = 'ACTIVE' WHERE lifecycle <> 'ACTIVE'"
                )
                await con.execute("VACUUM ANALYZE devices")
            ids = sorted(str(d[1]) for d in fleet.devices)
            built = time.perf_counter() - t0
            print(f"rollouts: {n:,} devices in one tenant (built in {built:.0f} s)")
            me = {"bench": [os.getpid()]}

            baseline: list[float] = []
            baseline_cpu: list[dict[str, float]] = []
            twins = await _refresh_twins(db, tenant)
            one = Database(await create_pool(dsn, size=1))
            try:

                async def baseline_once() -> None:
                    usage = await Usage(db, me).start()
                    baseline.append(
                        await baseline_round(one, tenant, ids, twins, len(baseline) + 1)
                    )
                    baseline_cpu.append(await usage.stop())
                    await _settle_tables(db)

                for _ in range(max(args.rounds - 1, 1)):
                    await baseline_once()

                async with services(dsn, binary) as (broker, processes, sim):
                    fixed = {
                        **me,
                        **{p.command: [p.pid] for p in processes},
                        "mosquitto": [broker.process.pid] if broker.process else [],
                    }
                    engine = await engine_phase(db, tenant, n, processes, sim, fixed)
                    rate = await rate_phase(dsn, db, processes, args.rate_seconds, fixed)
                    warnings = sum((p.warnings() for p in processes), collections.Counter())

                if args.rounds > 1:
                    await _settle_tables(db)
                    twins = await _refresh_twins(db, tenant)
                    await baseline_once()
            finally:
                await one.close()
        finally:
            await db.close()
    _report(n, baseline, baseline_cpu, engine, rate, warnings)
    print(f"  (the whole run took {time.perf_counter() - started:.0f} s)")


def _report(
    n: int,
    baseline: list[float],
    baseline_cpu: list[dict[str, float]],
    engine: EngineResult,
    rate: RateResult,
    warnings: collections.Counter[str],
) -> None:
    base = statistics.median(baseline)
    ratio = engine.writes_per_s / base
    rounds = " ".join(f"{r:,.0f}" for r in baseline)
    print(
        f"\nRollout of {n:,} devices, no rate limit, simulated devices acknowledging through "
        f"`pulse evaluator`, the engine in `pulse rollouts` (private mosquitto)"
    )
    print(
        f"  {'baseline: store.write_desired loop, 500/transaction':<54} "
        f"{base:9,.0f}/s  median of {len(baseline)}: {rounds}"
    )
    if baseline_cpu and "machine" in baseline_cpu[-1]:
        print(f"      cores used (last round): {_cpu_line(baseline_cpu[-1])}")
    print(
        f"  {'engine: desired writes of the rollout':<54} "
        f"{engine.writes_per_s:9,.0f}/s  {ratio:.2f} of baseline"
    )
    print(f"      cores used (creation to SUCCEEDED): {_cpu_line(engine.cpu)}")
    t = engine.ticks
    print(
        f"      {len(t.at):,} ticks wrote: devices per tick median "
        f"{statistics.median(t.started):.0f}; tick to tick {_cells(t.intervals, 'ms', 1000)}"
        f" (baseline: {BATCH / base * 1000:.0f} ms per {BATCH})"
    )
    if len(t.intervals) >= 20:
        tenth = len(t.intervals) // 10
        early = statistics.median(t.intervals[:tenth]) * 1000
        late = statistics.median(t.intervals[-tenth:]) * 1000
        print(f"      tick to tick, median of the first tenth {early:.0f} ms, last {late:.0f} ms")
    print(
        f"      creation (enrolling {n:,} devices) {engine.enrol_s:.1f} s, then first write "
        f"after {engine.first_wait_s:.2f} s; last write committed "
        f"{engine.all_started_s:.1f} s after creation began"
    )
    print(
        f"      write to outcome per device: {_cells(engine.outcome_s)}; most devices "
        f"written and waiting at once: {engine.peak_applied:,}"
    )
    done = (
        f"{engine.all_succeeded_s:.1f} s after creation began"
        if engine.all_succeeded_s is not None
        else f"never: the rollout ended {engine.state}"
    )
    others = {k: v for k, v in engine.states.items() if k != rules.SUCCEEDED}
    print(
        f"      every device SUCCEEDED: {done} ({engine.succeeded:,} of {n:,}"
        + (f"; others {others}" if others else "")
        + f"; {engine.answered:,} desired messages answered by the simulated devices)"
    )
    print(
        f"  rate: max_per_minute {RATE:,}, {rate.window_s:.0f} s window, {rate.devices:,} new "
        f"devices in another tenant"
    )
    error = (rate.per_minute / RATE - 1) * 100
    if rate.tick_intervals:
        print(
            f"      started {rate.started:,}: {rate.per_minute:,.0f}/min from the first tick "
            f"({error:+.2f}% of {RATE:,}); first tick {rate.first_wait_s:.2f} s after creation; "
            f"tick to tick median {statistics.median(rate.tick_intervals) * 1000:.0f} ms"
        )
    else:
        print(f"      started {rate.started:,}: too few ticks to measure a rate")
    if rate.windows_10s:
        print(
            f"      per 10 s window (as /min): median {statistics.median(rate.windows_10s):,.0f}, "
            f"min {min(rate.windows_10s):,.0f}, max {max(rate.windows_10s):,.0f}"
        )
    print(f"      cores used (the window): {_cpu_line(rate.cpu)}")
    if warnings:
        print(f"  pulse logged {sum(warnings.values()):,} warnings or errors:")
        for line, count in warnings.most_common(5):
            print(f"      {count:>9,} x {line[:150]}")
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"  engine / baseline = {ratio:.2f}; goal >= {GOAL:.2f}: {verdict}")
    print(f"  every device SUCCEEDED: {done} ({engine.succeeded:,} of {n:,})")
    held = ""
    if rate.max_in_60s is not None:
        ok = rate.max_in_60s <= RATE + 1
        held = f"; most started in any 60 s: {rate.max_in_60s:,} (limit {RATE + 1:,}): " + (
            "held" if ok else "EXCEEDED"
        )
    print(f"  rate accuracy at {RATE:,}/min: {error:+.2f}%{held}")


if __name__ == "__main__":
    run(main)
