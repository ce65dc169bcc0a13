"""Fixtures for the fault tests: real processes that each test starts, kills
and restarts by itself, and the evidence they leave.

- `mosquitto` / `mosquitto_factory`: a Mosquitto of the test's own on a free
  port (never the machine's 1883), anonymous (access control is not the
  subject here), queueing as `pulse broker-config mosquitto` sets it up
  (`max_queued_messages 1000000`), logging every packet; `persistence=True`
  keeps sessions on disk across a stop. It can be stopped, killed and
  started again on the same port. Skipped, naming the binary, without
  `mosquitto`.
- `evaluators`: `pulse evaluator` subprocesses with DATABASE_URL the session's
  test database (tests/conftest.py's `dsn`), MQTT_URL the test's Mosquitto
  and a fixed PULSE_EVALUATOR_ID, which a test starts, SIGKILLs and starts
  again; their logs are printed at teardown, so pytest shows them (and the
  broker's connection log) when a test fails.
- `ReportFlood`: devices publishing numbered reports (seq n, state
  `{"counter": n}`) at QoS 1, in order, counting those the broker PUBACKed:
  "published" means "the broker has it".
- `BrokerLog`: Mosquitto logs each PUBLISH it sends and each PUBACK it
  receives with the client id, so a test counts what each evaluator was
  given, given again and acknowledged, from outside the evaluator.
- `lost_devices`: devices whose stored report is not their last one.
- `Stall`: a transaction of the test's own holding `LOCK TABLE device_state
  IN EXCLUSIVE MODE`, which blocks every write of the evaluator's (twin
  ingest and liveness both write device_state) and lets reads through.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import psutil
import pytest

from bench.harness import free_port, listening, seed_tenant
from evaluator.retained_repair import MARKER_TOPIC
from server import wire
from server.db import Database

ROOT = Path(__file__).resolve().parents[2]

#: Whatever a test polls for is given this long before it fails.
DEADLINE_S = 45.0


def _executable(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


async def wait_for(
    check: Callable[[], Any],
    *,
    what: str,
    timeout: float = DEADLINE_S,  # noqa: ASYNC109
    interval: float = 0.05,
) -> float:
    """Poll `check` (sync or async) until it is true; seconds it took. Fails
    the test, saying `what` did not happen, past the deadline."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} did not happen within {timeout:.0f}s")
        await asyncio.sleep(interval)


async def end_process(
    process: asyncio.subprocess.Process | None, how: signal.Signals, *, grace_s: float = 15
) -> None:
    """Send `how` to a running process and wait; SIGKILL it past `grace_s`."""
    if process is None or process.returncode is not None:
        return
    process.send_signal(how)
    try:
        async with asyncio.timeout(grace_s):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


# -- Mosquitto ----------------------------------------------------------------

_SENT = re.compile(r"Sending PUBLISH to (\S+) \(d([01]), q\d, r\d, m\d+, '([^']*)'")
_ACKED = re.compile(r"Received PUBACK from (\S+) \(Mid: ")
_CONNECTED_AS = re.compile(r"New client connected from \S+ as (\S+) \(")


class BrokerLog:
    """Counts, per client id, from Mosquitto's log (read incrementally):
    device reports the broker sent (`sent`; `redelivered`: those with the
    DUP flag, sent again after a connection ended unacknowledged) and
    PUBACKs it received (`acked`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.sent: collections.Counter[str] = collections.Counter()
        self.redelivered: collections.Counter[str] = collections.Counter()
        self.acked: collections.Counter[str] = collections.Counter()
        #: Per client, per connection (in order): the most reports sent to
        #: that connection and not acknowledged at any point of the log.
        self.peaks: collections.defaultdict[str, list[int]] = collections.defaultdict(list)
        self._open: collections.Counter[str] = collections.Counter()

    def refresh(self) -> BrokerLog:
        if not self.path.exists():
            return self
        with self.path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace")
            if (sent := _SENT.search(line)) is not None:
                client, dup, topic = sent.groups()
                if topic.endswith("/twin/reported"):
                    self.sent[client] += 1
                    self.redelivered[client] += dup == "1"
                    self._open[client] += 1
                    peaks = self.peaks[client] or [0]
                    peaks[-1] = max(peaks[-1], self._open[client])
                    self.peaks[client] = peaks
            elif (acked := _ACKED.search(line)) is not None:
                self.acked[acked.group(1)] += 1
                self._open[acked.group(1)] -= 1
            elif (connected := _CONNECTED_AS.search(line)) is not None:
                # What the last connection left unacknowledged is not the new one's.
                self._open[connected.group(1)] = 0
                self.peaks[connected.group(1)].append(0)
        return self

    def unacknowledged(self, client: str) -> int:
        """Reports sent to `client`'s connections and not acknowledged (a
        redelivery counts again, so only meaningful within one connection)."""
        return self.sent[client] - self.acked[client]

    def connection_lines(self, last: int = 40) -> str:
        """The log's last lines about anything but message traffic."""
        if not self.path.exists():
            return "(no log)"
        traffic = ("PUBLISH", "PUBACK", "PINGREQ", "PINGRESP")
        lines = [
            line
            for line in self.path.read_text(errors="replace").splitlines()
            if not any(word in line for word in traffic)
        ]
        return "\n".join(lines[-last:])


class Mosquitto:
    """A Mosquitto of one test's own, which it may stop, kill and start again
    on the same port."""

    def __init__(self, binary: str, folder: Path, *, persistence: bool, marker: bool) -> None:
        self.binary = binary
        self.marker = marker
        self.port = free_port()
        self.folder = folder
        self.conf = folder / "mosquitto.conf"
        self.log = BrokerLog(folder / "mosquitto.log")
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # As `pulse broker-config mosquitto` sets it up: the default
            # (1000) would drop most of a burst the evaluator holds back.
            "max_queued_messages 1000000",
            f"log_dest file {self.log.path}",
            "log_type all",
        ]
        if persistence:
            lines += ["persistence true", f"persistence_location {folder}/"]
        if os.geteuid() == 0:
            # As root Mosquitto would switch to the `mosquitto` user, who
            # cannot write the log or the database in the test's folder.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            self.binary,
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if not await listening(self.port, self._process):
            pytest.fail(f"mosquitto did not start:\n{self.log.connection_lines()}")
        if self.marker:
            await self._set_marker()

    async def _set_marker(self) -> None:
        """Make this a broker in service: one holding the evaluator's retained
        marker, so the evaluator does not start by republishing every desired
        document of the database (evaluator/retained_repair.py; its own test
        is test_fresh_broker.py), which would only add noise here."""
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="faults-marker") as client:
            await client.publish(
                MARKER_TOPIC, json.dumps({"set_by": "tests/faults"}).encode(), qos=1, retain=True
            )

    async def stop(self) -> None:
        """SIGTERM: a broker with persistence saves its sessions first."""
        await self._end(signal.SIGTERM)

    async def kill(self) -> None:
        await self._end(signal.SIGKILL)

    async def _end(self, how: signal.Signals) -> None:
        process, self._process = self._process, None
        await end_process(process, how)


MosquittoFactory = Callable[..., Awaitable[Mosquitto]]


@pytest.fixture
async def mosquitto_factory(tmp_path: Path) -> AsyncIterator[MosquittoFactory]:
    """`await mosquitto_factory(persistence=False, marker=True)`: a started
    Mosquitto of the test's own (`marker`: holding the evaluator's retained
    marker, as a broker in service does); all are killed after the test."""
    binary = _executable("mosquitto")
    if binary is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    started: list[Mosquitto] = []

    async def factory(*, persistence: bool = False, marker: bool = True) -> Mosquitto:
        assert binary is not None
        folder = tmp_path / f"mosquitto-{len(started)}"
        folder.mkdir()
        broker = Mosquitto(binary, folder, persistence=persistence, marker=marker)
        started.append(broker)
        await broker.start()
        return broker

    yield factory
    for broker in started:
        await broker.kill()
        print(f"\n=== mosquitto on port {broker.port}: connections ===")
        print(broker.log.connection_lines())


@pytest.fixture
async def mosquitto(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    return await mosquitto_factory()


# -- the evaluator as a subprocess --------------------------------------------

_CONNECTED = re.compile(r"evaluator connected to \S+ \(MQTT ([\d.]+), session (\w+)\)")


def _pulse_command() -> list[str]:
    script = Path(sys.executable).parent / "pulse"
    if script.exists():
        return [str(script), "evaluator"]
    return [sys.executable, "-c", "from launcher.cli import main; main()", "evaluator"]


@dataclass(frozen=True)
class Connected:
    """What an evaluator said when it connected."""

    protocol: str  # "5" or "3.1.1"
    session: str  # "new" or "resumed"


class EvaluatorProcess:
    """`pulse evaluator` in a subprocess, its stderr appended to a log file
    that survives kills and restarts."""

    def __init__(self, client_id: str, env: dict[str, str], log_path: Path) -> None:
        self.client_id = client_id
        self.env = env
        self.log_path = log_path
        self.starts = 0
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def rss(self) -> int:
        """Resident memory, bytes."""
        rss: int = psutil.Process(self.pid).memory_info().rss
        return rss

    def cpu_s(self) -> float:
        """CPU time used so far (user and system), seconds."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self) -> Connected:
        """Start and wait until it is connected and subscribed."""
        assert not self.running, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            offset = log.tell()
            self._process = await asyncio.create_subprocess_exec(
                *_pulse_command(),
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        found: list[Connected] = []

        def connected() -> bool:
            if self._process is not None and self._process.returncode is not None:
                pytest.fail(
                    f"evaluator {self.client_id} exited with {self._process.returncode}:\n"
                    + self.log_text()[-4000:]
                )
            with self.log_path.open("rb") as file:
                file.seek(offset)
                text = file.read().decode(errors="replace")
            match = _CONNECTED.search(text)
            if match is not None:
                found.append(Connected(*match.groups()))
            return match is not None

        await wait_for(connected, what=f"evaluator {self.client_id} connecting")
        return found[0]

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as a crash or an OOM kill."""
        await self._end(signal.SIGKILL)

    async def stop(self) -> None:
        await self._end(signal.SIGTERM)

    async def _end(self, how: signal.Signals) -> None:
        process, self._process = self._process, None
        await end_process(process, how)


EvaluatorFactory = Callable[..., EvaluatorProcess]


def pulse_env(overrides: dict[str, str]) -> dict[str, str]:
    # Nothing of the caller's configuration leaks in (a DATABASE_URL or
    # MQTT_URL naming the shared services, PULSE_* tunings).
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PULSE_") and key not in ("DATABASE_URL", "MQTT_URL")
    }
    env.update(overrides)
    return env


@pytest.fixture
async def evaluators(dsn: str, db: Database, tmp_path: Path) -> AsyncIterator[EvaluatorFactory]:
    """`evaluators(mqtt_url, client_id, shared_group=None, inflight=None)`:
    an evaluator process, not started yet. All are killed after the test and
    their logs printed (shown by pytest when the test failed).

    Desired writes that earlier tests left waiting to be published are
    dropped first: these evaluators would otherwise take them up."""
    async with db.admin() as con:
        await con.execute("DELETE FROM twin_outbox")
    made: list[EvaluatorProcess] = []
    data = tmp_path / "pulse-data"
    data.mkdir()
    secret = secrets.token_hex(32)

    def factory(
        mqtt_url: str,
        client_id: str,
        *,
        shared_group: str | None = None,
        inflight: int | None = None,
    ) -> EvaluatorProcess:
        env = {
            "DATABASE_URL": dsn,
            "MQTT_URL": mqtt_url,
            "PULSE_EVALUATOR_ID": client_id,
            "PULSE_DATA_DIR": str(data),
            "PULSE_SECRET": secret,
            "PULSE_LOG_LEVEL": "INFO",
        }
        if shared_group is not None:
            env["PULSE_MQTT_SHARED_GROUP"] = shared_group
        if inflight is not None:
            env["PULSE_EVALUATOR_INFLIGHT"] = str(inflight)
        process = EvaluatorProcess(
            client_id, pulse_env(env), tmp_path / f"evaluator-{client_id}.log"
        )
        made.append(process)
        return process

    yield factory
    for process in made:
        await process.kill()
    for process in made:
        print(f"\n=== evaluator {process.client_id} ({process.starts} starts): log ===")
        print(process.log_text()[-6000:])


# -- devices ------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """Registered, active devices of a new tenant, whose desired version
    allows the reports the flood sends."""

    tenant_id: uuid.UUID
    device_ids: tuple[str, ...]
    desired_version: int


async def seed_fleet(dsn: str, devices: int, *, desired_version: int = 1) -> Fleet:
    ids = tuple(f"FAULT-{n:04d}" for n in range(1, devices + 1))
    tenant_id = await seed_tenant(dsn, ids, desired_version=desired_version)
    return Fleet(tenant_id, ids, desired_version)


@dataclass
class ReportFlood:
    """Every device of `fleet` publishes reports 1..`reports` on its
    `twin/reported` topic at QoS 1: state `{"counter": n}` (plus `pad`
    characters of padding), seq n. A device has at most `window` reports
    awaiting the broker's PUBACK (1: each waits for the one before); MQTT
    keeps one client's messages in order either way. `published` counts the
    PUBACKed ones: what the broker has. Devices stop before report `hold_at`
    until `go` is set.
    """

    port: int
    fleet: Fleet
    reports: int
    pad: int = 0
    window: int = 1
    hold_at: int | None = None
    published: int = 0
    go: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        return self.reports * len(self.fleet.device_ids)

    @property
    def done(self) -> bool:
        return self.published == self.total

    def state(self, n: int) -> dict[str, Any]:
        state: dict[str, Any] = {"counter": n}
        if self.pad:
            state["pad"] = "x" * self.pad
        return state

    def payload(self, n: int) -> bytes:
        return wire.reported(self.state(n), self.fleet.desired_version, seq=n)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for device_id in self.fleet.device_ids:
                tasks.create_task(self._device(device_id))

    async def _device(self, device_id: str) -> None:
        topic = wire.topic(self.fleet.tenant_id, device_id, "twin/reported")
        slots = asyncio.Semaphore(self.window)

        async def send(client: aiomqtt.Client, n: int) -> None:
            try:
                await client.publish(topic, self.payload(n), qos=1)
                self.published += 1
            finally:
                slots.release()

        async with (
            aiomqtt.Client(
                "127.0.0.1",
                self.port,
                identifier=f"{self.fleet.tenant_id}/{device_id}",
                timeout=30,
                max_inflight_messages=max(20, self.window),
            ) as client,
            asyncio.TaskGroup() as sends,
        ):
            for n in range(1, self.reports + 1):
                if n == self.hold_at:
                    await self.go.wait()
                await slots.acquire()
                # Tasks start in creation order, and each hands its message
                # to paho before its first await: sent in order.
                sends.create_task(send(client, n))


@contextlib.asynccontextmanager
async def flooding(flood: ReportFlood) -> AsyncIterator[asyncio.Task[None]]:
    """The flood running in the background; cancelled if the block fails."""
    task = asyncio.create_task(flood.run(), name="report flood")
    try:
        yield task
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the database -------------------------------------------------------------


async def stored_count(db: Database, fleet: Fleet) -> int:
    """Reports stored so far, counting each device's stored seq as that many
    (its reports up to it are all in the past of what is stored)."""
    async with db.tenant(fleet.tenant_id, readonly=True) as con:
        count: int = await con.fetchval(
            "SELECT coalesce(sum(reported_seq), 0) FROM device_state WHERE tenant_id = $1",
            fleet.tenant_id,
        )
    return count


async def lost_devices(db: Database, flood: ReportFlood) -> list[str]:
    """Devices whose stored report is not their last one (seq and document),
    compared in the database so that polling costs little."""
    async with db.tenant(flood.fleet.tenant_id, readonly=True) as con:
        rows = await con.fetch(
            """
            SELECT d.id FROM unnest($2::text[]) AS d(id)
            LEFT JOIN device_state s ON s.tenant_id = $1 AND s.device_id = d.id
            WHERE s.reported_seq IS DISTINCT FROM $3 OR s.reported IS DISTINCT FROM $4::jsonb
            ORDER BY d.id
            """,
            flood.fleet.tenant_id,
            list(flood.fleet.device_ids),
            flood.reports,
            flood.state(flood.reports),
        )
    return [row["id"] for row in rows]


async def until_all_last(
    db: Database,
    flood: ReportFlood,
    what: str,
    *,
    timeout: float = DEADLINE_S,  # noqa: ASYNC109
) -> float:
    """Wait until every device's last report is stored; seconds it took."""

    async def none_lost() -> bool:
        return not await lost_devices(db, flood)

    return await wait_for(none_lost, what=what, timeout=timeout, interval=0.1)


class Stall:
    """The database stalled for the evaluator: a transaction of the test's
    own holds `LOCK TABLE device_state IN EXCLUSIVE MODE`, which conflicts
    with the row locks and updates of twin ingest and liveness (and lets
    plain reads through), until `release`."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._con: asyncpg.Connection[asyncpg.Record] | None = None

    async def hold(self) -> None:
        con = await asyncpg.connect(self._dsn)
        await con.execute("BEGIN; LOCK TABLE device_state IN EXCLUSIVE MODE")
        self._con = con

    async def release(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            await con.execute("ROLLBACK")
            await con.close()


@pytest.fixture
async def stall(dsn: str) -> AsyncIterator[Stall]:
    """A Stall, released after the test whatever happened."""
    held = Stall(dsn)
    try:
        yield held
    finally:
        await held.release()


async def waiting_on_device_state(db: Database) -> int:
    """Backends of this database waiting for a lock on device_state."""
    async with db.admin() as con:
        count: int = await con.fetchval(
            """
            SELECT count(*) FROM pg_locks l
            JOIN pg_database d ON d.oid = l.database AND d.datname = current_database()
            WHERE NOT l.granted AND l.relation = 'device_state'::regclass
            """
        )
    return count


@contextlib.contextmanager
def rss_sampler(process: EvaluatorProcess, samples: list[int]) -> Iterator[None]:
    """Samples `process`'s RSS every 20 ms into `samples` while the block runs."""

    async def sample() -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                samples.append(process.rss())
            await asyncio.sleep(0.02)

    task = asyncio.get_running_loop().create_task(sample())
    try:
        yield
    finally:
        task.cancel()
