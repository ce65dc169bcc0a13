"""Reported-state ingest: MQTT messages per second into PostgreSQL, beside a
bare aiomqtt subscriber that only counts messages from the same broker.

In one run, alternating rounds of each (the pairs in turns first):
  1. bare: an aiomqtt client that counts what it receives (the ceiling of
     publishers, broker and an MQTT client);
  2. ack on receipt: the evaluator's MQTT loop with the twin ingest handler
     (`Evaluator(..., ack_after_commit=False)`, the old behaviour), timed
     until the last message's effect is in PostgreSQL (RLS on, one
     statement per tenant per batch);
  3. ack after commit: the same with each message acknowledged only once the
     statement storing it committed (the default; MQTT 5 persistent session,
     receive maximum `inflight_max` 1,000). Goal: >= 0.90 of (2);
  4. with MQTT_URL (Mosquitto) only, since the embedded broker has no shared
     subscriptions: one evaluator in a subprocess, then two in separate
     subprocesses with the same `shared_group` (each an Evaluator with the
     twin ingest handler and its own pool, acknowledging after commit; they
     print their counters on a pipe every 10 ms). Goal: two >= 1.6x one.
Ratios are medians of the ratios of rounds that ran back to back.

Publisher subprocesses (paho, QoS 1; two, each owning half the devices so
that every device's messages stay in order) send `twin/reported` for 3,000
devices with rising versions and a `seq` (the message's number). They are
kept at most WINDOW messages ahead of what the consumer took, so the
broker's per-client queue (Mosquitto's max_queued_messages, 1,000 by
default) never overflows and drops QoS 1 messages; "took" is what it
received, less what it holds unacknowledged beyond the receive maximum
(Mosquitto 2.0.11 sends more than that, then drops what its queue limit no
longer admits). After every storing round each device's stored report must
be its last message of the round (its highest seq). Every session is
discarded after its round (a clean-session connection with the same client
id; the evaluators' sessions also expire after SESSION_EXPIRY_S), so that
nothing keeps queueing on a shared broker, and every consumer subscribes
to this run's tenant only (`pulse/{tenant}/+/#`): other traffic on a shared
broker is not measured.

Besides rates, each mode prints the cores used during its rounds (from
/proc: the bench's processes, this database's PostgreSQL backends, a local
Mosquitto, and "other", the rest of the machine's, which is what other
work on the machine took), the CPU time spent per message, and for (4) the
rates that CPU per message allows when the machine is the bench's alone:
on a machine that one evaluator already fills, a second cannot add much.

    MQTT_URL=mqtt://127.0.0.1:1883 DATABASE_URL=postgresql://... \\
        .venv/bin/python -m bench.ingest

Without MQTT_URL it uses the embedded amqtt broker (access control on, the
publishers and evaluators a service identity, MQTT 3.1.1; it runs in the
bench process), which is far slower than Mosquitto, so rates then mostly
measure amqtt; without DATABASE_URL an embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from bench.harness import ROOT, run, scratch_database, seed_tenant
from evaluator.runtime import Evaluator
from evaluator.service import mqtt_broker
from evaluator.twin_ingest import TwinIngest
from server import wire
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_broker
from server.twin import store

DEVICES = 3000
PER_ROUND = 9_000
# The embedded broker is several times slower: fewer, so that a run stays
# within a few minutes. Both are more than one message per device.
PER_ROUND_EMBEDDED = 6_000
ROUNDS = 3
WINDOW = 800
CHUNK = 100
PUBLISHERS = 2
ACK_GOAL = 0.90
SHARED_GOAL = 1.6
SESSION_EXPIRY_S = 10
INFLIGHT = 1000  # the evaluator's inflight_max (its default)
POOL_SIZE = 10
REPORT_EVERY_S = 0.01
# A round that makes no progress this long lost messages (or the broker is
# gone): fail rather than hang.
STALL_S = 30.0

_ROLE = "BENCH_INGEST_ROLE"


def _payload(k: int) -> bytes:
    state = {"k": k, "temp_c": 20 + k % 10, "fw": "1.4.2", "rssi": -60 - k % 7}
    return wire.reported(state, k // DEVICES + 1, seq=k)


def _device(k: int) -> str:
    return f"ING-{k % DEVICES:05d}"


def _filter(tenant: uuid.UUID) -> str:
    return f"{wire.PREFIX}/{tenant}/+/#"


# -- the publisher subprocesses ------------------------------------------------


def _publisher() -> None:
    """Publish messages k = index, index + n, ... (n publishers): as many as
    each stdin line grants. DEVICES is a multiple of n, so each device has
    one publisher and its messages arrive in order."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = parse_broker(os.environ["BENCH_MQTT_URL"])
    tenant = uuid.UUID(os.environ["BENCH_TENANT"])
    k, n = int(os.environ["BENCH_PUBLISHER"]), int(os.environ["BENCH_PUBLISHERS"])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(200)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    print("ready", flush=True)
    for line in sys.stdin:
        for _ in range(int(line)):
            client.publish(wire.topic(tenant, _device(k), "twin/reported"), _payload(k), qos=1)
            k += n
    client.loop_stop()
    client.disconnect()


class Feed:
    """The publisher subprocesses, fed credits in equal shares."""

    def __init__(self, procs: Sequence[asyncio.subprocess.Process]) -> None:
        self.procs = list(procs)
        self.sent = 0

    async def grant(self, n: int) -> None:
        assert n % len(self.procs) == 0
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{n // len(self.procs)}\n".encode())
        for proc in self.procs:
            assert proc.stdin is not None
            await proc.stdin.drain()
        self.sent += n


@contextlib.asynccontextmanager
async def publishers(mqtt_url: str, tenant: uuid.UUID, n: int = PUBLISHERS) -> AsyncIterator[Feed]:
    """`n` publisher subprocesses, connected."""
    assert DEVICES % n == 0
    procs = []
    try:
        for index in range(n):
            env = {
                **os.environ,
                _ROLE: "publisher",
                "BENCH_MQTT_URL": mqtt_url,
                "BENCH_TENANT": str(tenant),
                "BENCH_PUBLISHER": str(index),
                "BENCH_PUBLISHERS": str(n),
            }
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.ingest",
                    cwd=ROOT,
                    env=env,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for proc in procs:
            # Connected: their start-up is no part of the first round.
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise RuntimeError("a publisher did not start")
        yield Feed(procs)
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)


def publisher(mqtt_url: str, tenant: uuid.UUID) -> contextlib.AbstractAsyncContextManager[Feed]:
    """One publisher subprocess (bench.device_access)."""
    return publishers(mqtt_url, tenant, 1)


# -- the evaluator subprocesses ------------------------------------------------


def _evaluator(
    mqtt_url: str,
    ingest: TwinIngest,
    tenant: uuid.UUID,
    client_id: str,
    *,
    ack_after_commit: bool = True,
    shared_group: str | None = None,
) -> Evaluator:
    evaluator = Evaluator(
        mqtt_url,
        [ingest],
        client_id=client_id,
        shared_group=shared_group,
        session_expiry_s=SESSION_EXPIRY_S,
        inflight_max=INFLIGHT,
        ack_after_commit=ack_after_commit,
    )
    # This run's tenant only: other traffic on a shared broker (other test
    # runs publish there) is not what is measured.
    topics = _filter(tenant)
    evaluator._subscription = f"$share/{shared_group}/{topics}" if shared_group else topics
    return evaluator


async def _evaluator_process() -> None:
    """One evaluator until stdin closes; prints "ready", then its counters
    ("received done unacknowledged") every REPORT_EVERY_S when they moved,
    then its ingest's outcome counts as JSON."""
    tenant = uuid.UUID(os.environ["BENCH_TENANT"])
    db = Database(await create_pool(os.environ["BENCH_DSN"], size=POOL_SIZE))
    ingest = TwinIngest(db)
    evaluator = _evaluator(
        os.environ["BENCH_MQTT_URL"],
        ingest,
        tenant,
        os.environ["BENCH_CLIENT_ID"],
        shared_group=os.environ["BENCH_GROUP"],
    )
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    closed = asyncio.create_task(stdin.read())

    def say(line: str) -> None:
        os.write(1, f"{line}\n".encode())

    task = asyncio.create_task(evaluator.run())
    try:
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        say("ready")
        last = (0, 0, 0)
        while not closed.done():
            now = (evaluator.received, ingest.accepted + ingest.rejected, evaluator.unacknowledged)
            if now != last:
                say(" ".join(map(str, now)))
                last = now
            await asyncio.wait([closed], timeout=REPORT_EVERY_S)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await db.close()
    say(json.dumps(dict(ingest.counts)))


@dataclass
class Remote:
    """An evaluator subprocess and its last reported counters."""

    proc: asyncio.subprocess.Process
    client_id: str
    received: int = 0
    done: int = 0
    unacknowledged: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line == "ready":
                self.ready.set()
            elif line.startswith("{"):
                self.counts.update(json.loads(line))
            else:
                received, done, unacknowledged = map(int, line.split())
                self.received, self.done, self.unacknowledged = received, done, unacknowledged


@contextlib.asynccontextmanager
async def remote_evaluators(
    n: int, dsn: str, mqtt_url: str, tenant: uuid.UUID
) -> AsyncIterator[list[Remote]]:
    """`n` evaluator subprocesses sharing a fresh group, connected; on exit
    stopped and their sessions discarded."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    remotes: list[Remote] = []
    readers: list[asyncio.Task[None]] = []
    try:
        for _ in range(n):
            client_id = f"bench-evaluator-{uuid.uuid4().hex[:8]}"
            env = {
                **os.environ,
                _ROLE: "evaluator",
                "BENCH_DSN": dsn,
                "BENCH_MQTT_URL": mqtt_url,
                "BENCH_TENANT": str(tenant),
                "BENCH_CLIENT_ID": client_id,
                "BENCH_GROUP": group,
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.ingest",
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            remote = Remote(proc, client_id)
            remotes.append(remote)
            readers.append(asyncio.create_task(remote.read()))
        for remote in remotes:
            await asyncio.wait_for(remote.ready.wait(), 30)
        yield remotes
    finally:
        for remote in remotes:
            assert remote.proc.stdin is not None
            remote.proc.stdin.close()
        for remote in remotes:
            await asyncio.wait_for(remote.proc.wait(), 30)
        for reader in readers:
            await reader
        for remote in remotes:
            await _forget_session(mqtt_url, remote.client_id)


# -- measuring -----------------------------------------------------------------


class Cpu:
    """CPU use over an interval from /proc (Linux; nothing elsewhere), in
    cores: the machine's, and each group of processes'."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._machine0 = self._machine()
        self._ticks0 = {pid: self._process(pid) for pids in groups.values() for pid in pids}
        self._t0 = time.perf_counter()

    @staticmethod
    def _machine() -> tuple[int, int] | None:
        """(busy, all) ticks of every core."""
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def _process(pid: int) -> int | None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def stop(self, groups: dict[str, list[int]]) -> dict[str, float]:
        """{"machine": cores busy, group: cores used, "other": the rest of
        the machine's}; a process that started meanwhile counts whole.
        Empty without /proc."""
        elapsed = time.perf_counter() - self._t0
        shares: dict[str, float] = {}
        if self._machine0 is None:
            return shares
        for name, pids in groups.items():
            ticks = 0
            for pid in pids:
                end = self._process(pid)
                if end is not None:
                    ticks += end - (self._ticks0.get(pid) or 0)
            shares[name] = ticks / self._tick / elapsed
        machine0, machine1 = self._machine0, self._machine()
        if machine0 is not None and machine1 is not None and machine1[1] > machine0[1]:
            cores = os.cpu_count() or 1
            busy = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * cores
            shares["other"] = max(0.0, busy - sum(shares.values()))
            shares["machine"] = busy
        return shares


class Watch:
    """The processes whose CPU use a round reports: the bench's own, this
    database's PostgreSQL backends (not the server's shared writers) and the
    broker's, when they run on this machine."""

    def __init__(self, db: Database, broker_url: str | None, fixed: dict[str, list[int]]) -> None:
        """`broker_url`: MQTT_URL, or None for the embedded broker (which
        runs in the bench process)."""
        self._db = db
        self._fixed = fixed
        local = broker_url is not None and parse_broker(broker_url).host in _LOOPBACK
        self._broker = _processes_named("mosquitto") if local else []

    async def pids(self, extra: dict[str, list[int]]) -> dict[str, list[int]]:
        async with self._db.admin() as con:
            rows = await con.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        postgres = [r["pid"] for r in rows if _comm(r["pid"]).startswith("postgres")]
        groups = {**self._fixed, **extra, "postgres": postgres}
        if self._broker:
            groups["mosquitto"] = self._broker
        return groups


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _processes_named(name: str) -> list[int]:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return [int(e) for e in entries if e.isdigit() and _comm(int(e)) == name]


@dataclass
class Mode:
    label: str
    rates: list[float] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    #: The most messages received and not yet acknowledged at once.
    peak_unacknowledged: int = 0

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def over(self, other: Mode) -> float:
        """The median of the rounds' ratios to `other`'s (each pair of rounds
        ran back to back, so a load that drifts over the run cancels)."""
        return statistics.median(a / b for a, b in zip(self.rates, other.rates, strict=True))

    def cpu_line(self) -> str:
        """Median cores used: the machine's, then by whom."""

        def median(name: str) -> float:
            return statistics.median(sample.get(name, 0.0) for sample in self.cpu)

        names = [n for n in self.cpu[0] if n not in ("machine", "other")] if self.cpu else []
        if not self.cpu or "machine" not in self.cpu[0]:
            return ", ".join(f"{n} {median(n):.2f}" for n in names)
        parts = [f"{n} {median(n):.2f}" for n in [*names, "other"]]
        return f"{median('machine'):.2f} = " + " + ".join(parts)

    def cost(self, groups: Sequence[str]) -> float | None:
        """The median CPU time per message (us) of these groups together."""
        if len(self.cpu) != len(self.rates):
            return None
        per = [
            sum(sample.get(g, 0.0) for g in groups) / rate * 1e6
            for sample, rate in zip(self.cpu, self.rates, strict=True)
            if any(g in sample for g in groups)
        ]
        return statistics.median(per) if per else None

    def groups(self) -> list[str]:
        return [g for g in (self.cpu[0] if self.cpu else {}) if g not in ("machine", "other")]


@dataclass(frozen=True)
class Probe:
    """What a round reads of its consumer: messages received, messages
    whose outcome is stored, and per connection the messages received and
    not yet acknowledged."""

    received: Callable[[], int]
    done: Callable[[], int]
    unacknowledged: Callable[[], Sequence[int]] = lambda: ()

    def consumed(self) -> int:
        """The messages the broker no longer counts against its queue: those
        received, less any unacknowledged beyond the receive maximum (a
        broker should never send those, but Mosquitto 2.0.11 does, and then
        drops what its queue limit no longer admits)."""
        return self.received() - sum(max(0, n - INFLIGHT) for n in self.unacknowledged())


async def timed_round(
    feed: Feed, consumed: Callable[[], int], done: Callable[[], int], count: int
) -> float:
    """Messages per second until `done` reaches `count` more than before,
    the publishers kept at most WINDOW messages ahead of `consumed` (for
    other benches: bench.device_access)."""
    mode = Mode("round")
    await measured_round(feed, Probe(consumed, done), count, mode)
    return mode.rates[0]


async def measured_round(
    feed: Feed,
    probe: Probe,
    count: int,
    mode: Mode,
    watch: Watch | None = None,
    pids: dict[str, list[int]] | None = None,
) -> None:
    """A round of `mode`: messages per second until `count` more messages
    are done, the publishers kept at most WINDOW messages ahead of what was
    consumed; with `watch`, the CPU that its processes and `pids` used."""
    consumed_at, done_at, sent_at = probe.consumed(), probe.done(), feed.sent
    groups = await watch.pids(pids or {}) if watch is not None else {}
    cpu = Cpu(groups)
    start = progress_at = time.perf_counter()
    progress = (consumed_at, done_at)
    while (done := probe.done()) - done_at < count:
        consumed = probe.consumed()
        mode.peak_unacknowledged = max(mode.peak_unacknowledged, *probe.unacknowledged(), 0)
        outstanding = (feed.sent - sent_at) - (consumed - consumed_at)
        if feed.sent - sent_at < count and outstanding <= WINDOW - CHUNK:
            await feed.grant(min(CHUNK, count - (feed.sent - sent_at)))
            continue
        await asyncio.sleep(0.002)
        now = time.perf_counter()
        if (consumed, done) != progress:
            progress, progress_at = (consumed, done), now
        elif now - progress_at > STALL_S:
            raise RuntimeError(
                f"{mode.label}: no progress for {STALL_S:.0f}s at {done - done_at:,} of "
                f"{count:,} done, {probe.received() - consumed_at:,} received, "
                f"{feed.sent - sent_at:,} sent: messages lost? (the broker's log may say)"
            )
    mode.rates.append(count / (time.perf_counter() - start))
    if watch is not None:
        mode.cpu.append(cpu.stop(await watch.pids(pids or {})))


async def _forget_session(mqtt_url: str, client_id: str) -> None:
    options = parse_broker(mqtt_url).client_options()
    async with aiomqtt.Client(**options, identifier=client_id, clean_session=True):
        pass


async def _verify(db: Database, tenant: uuid.UUID, end: int) -> str:
    """ "" if each device holds its last message before `end` (a storing
    round sends more than one message per device)."""
    async with db.tenant(tenant, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id, (reported->>'k')::bigint AS k, reported_seq, reported_version "
            "FROM device_state WHERE tenant_id = $1",
            tenant,
        )
    stored = {r["device_id"]: (r["k"], r["reported_seq"], r["reported_version"]) for r in rows}
    wrong = sum(
        stored.get(_device(k)) != (k, k, k // DEVICES + 1) for k in range(end - DEVICES, end)
    )
    return f"{wrong} devices do not hold their last report" if wrong else ""


def _unexpected(counts: Counter[str], shared: bool) -> int:
    """Rejections that are bugs: with several evaluators an older message
    may lose to a newer one another evaluator stored first (out_of_order)."""
    allowed = store.ACCEPTED | ({store.OUT_OF_ORDER} if shared else set())
    return sum(n for reason, n in counts.items() if reason not in allowed)


@dataclass
class Run:
    """What every round of a run shares."""

    dsn: str
    mqtt_url: str
    db: Database
    tenant: uuid.UUID
    feed: Feed
    watch: Watch
    count: int

    async def bare(self, mode: Mode) -> None:
        """A round of an aiomqtt client that counts what it receives."""
        prefix = f"{wire.PREFIX}/{self.tenant}/"
        received = 0

        async def tally(client: aiomqtt.Client) -> None:
            nonlocal received
            async for message in client.messages:
                if message.topic.value.startswith(prefix):
                    received += 1

        client_id = f"bench-bare-{uuid.uuid4().hex[:8]}"
        options = parse_broker(self.mqtt_url).client_options()
        async with aiomqtt.Client(
            **options, identifier=client_id, clean_session=False, keepalive=30
        ) as client:
            await client.subscribe(_filter(self.tenant), qos=1)
            counter = asyncio.create_task(tally(client))
            probe = Probe(lambda: received, lambda: received)
            await measured_round(self.feed, probe, self.count, mode, self.watch)
            counter.cancel()
        # The client unsubscribes by leaving; its session must not keep
        # queueing.
        await _forget_session(self.mqtt_url, client_id)

    async def local(self, mode: Mode, ingest: TwinIngest, *, ack_after_commit: bool) -> None:
        """A round of an evaluator in this process, then its session discarded."""
        client_id = f"bench-evaluator-{uuid.uuid4().hex[:8]}"
        evaluator = _evaluator(
            self.mqtt_url, ingest, self.tenant, client_id, ack_after_commit=ack_after_commit
        )
        task = asyncio.create_task(evaluator.run())
        try:
            await asyncio.wait_for(evaluator.connected.wait(), 10)
            probe = Probe(
                lambda: evaluator.received,
                lambda: ingest.accepted + ingest.rejected,
                lambda: [evaluator.unacknowledged],
            )
            await measured_round(self.feed, probe, self.count, mode, self.watch)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await _forget_session(self.mqtt_url, client_id)
        await self._verify(mode)

    async def remote(self, mode: Mode, processes: int) -> None:
        """A round of evaluator subprocesses in one shared group."""
        async with remote_evaluators(processes, self.dsn, self.mqtt_url, self.tenant) as remotes:
            workers = {f"evaluator {i + 1}": [r.proc.pid] for i, r in enumerate(remotes)}
            probe = Probe(
                lambda: sum(r.received for r in remotes),
                lambda: sum(r.done for r in remotes),
                lambda: [r.unacknowledged for r in remotes],
            )
            await measured_round(self.feed, probe, self.count, mode, self.watch, workers)
        for remote in remotes:
            mode.counts.update(remote.counts)
        await self._verify(mode)

    async def _verify(self, mode: Mode) -> None:
        if problem := await _verify(self.db, self.tenant, self.feed.sent):
            mode.wrong.append(problem)


def _quiet_protocol_fallback(record: logging.LogRecord) -> bool:
    # The evaluator tries MQTT 5 first; the embedded broker refuses it, and
    # says so once a round.
    return "protocol level 5" not in record.getMessage()


async def main() -> None:
    async with contextlib.AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(scratch_database())
        access = Database(await create_pool(dsn, size=2))
        stack.push_async_callback(access.close)
        configured = os.environ.get("MQTT_URL")
        shared = configured is not None
        if not shared:
            logging.getLogger("amqtt.broker").addFilter(_quiet_protocol_fallback)
        mqtt_url = await stack.enter_async_context(mqtt_broker(configured, access, service="bench"))
        db = Database(await create_pool(dsn, size=POOL_SIZE))
        stack.push_async_callback(db.close)
        # Every version the publishers will send is one that was asked for.
        tenant = await seed_tenant(
            dsn, [_device(k) for k in range(DEVICES)], desired_version=1_000_000
        )
        async with db.admin() as con:
            # Plans as in steady state from the first round, rather than
            # changing when autovacuum first gets to the new rows.
            await con.execute("ANALYZE devices, device_state")
        count = PER_ROUND if shared else PER_ROUND_EMBEDDED
        print(
            f"twin/reported ingest, QoS 1, {DEVICES} devices, {count:,} messages a round "
            f"from {PUBLISHERS} publisher processes, window {WINDOW}, medians of {ROUNDS} "
            f"rounds ({parse_broker(mqtt_url).safe_url}, {os.cpu_count()} cores)"
        )
        feed = await stack.enter_async_context(publishers(mqtt_url, tenant))
        # The embedded broker runs in the bench process.
        me = "bench" if shared else "bench+broker"
        watch = Watch(
            db, configured, {me: [os.getpid()], "publishers": [p.pid for p in feed.procs]}
        )
        run = Run(dsn, mqtt_url, db, tenant, feed, watch, count)

        bare = Mode("bare aiomqtt subscriber (counts only)")
        on_receipt = Mode("evaluator, ack on receipt")
        after_commit = Mode("evaluator, ack after commit")
        one = Mode("1 evaluator process (shared group)")
        two = Mode("2 evaluator processes (shared group)")
        ingests = {on_receipt.label: TwinIngest(db), after_commit.label: TwinIngest(db)}
        for i in range(ROUNDS):
            # Each pair in turns first, so that neither always runs on the
            # heels of the same neighbour.
            await run.bare(bare)
            acks = [(on_receipt, False), (after_commit, True)]
            for mode, ack_after_commit in acks if i % 2 == 0 else acks[::-1]:
                await run.local(mode, ingests[mode.label], ack_after_commit=ack_after_commit)
            if shared:
                for mode, processes in [(one, 1), (two, 2)][:: 1 if i % 2 == 0 else -1]:
                    await run.remote(mode, processes)
        for mode in (on_receipt, after_commit):
            mode.counts.update(ingests[mode.label].counts)
        _report(bare, on_receipt, after_commit, one if shared else None, two if shared else None)


def _report(
    bare: Mode, on_receipt: Mode, after_commit: Mode, one: Mode | None, two: Mode | None
) -> None:
    cores = os.cpu_count() or 1

    def row(mode: Mode, ratio: str = "") -> None:
        rounds = " ".join(f"{r:,.0f}" for r in mode.rates)
        print(f"  {mode.label:<38} {mode.rate:9,.0f}/s  {ratio:<22} rounds: {rounds}")
        if not mode.groups():
            return  # no /proc
        print(f"      cores used: {mode.cpu_line()}")
        consumer = [g for g in mode.groups() if g.startswith(("bench", "evaluator"))]
        costs = {
            "consumer": mode.cost(consumer),
            "postgres": mode.cost(["postgres"]),
            "mosquitto": mode.cost(["mosquitto"]),
            "publishers": mode.cost(["publishers"]),
        }
        parts = [f"{name} {us:,.0f}" for name, us in costs.items() if us is not None]
        print("      CPU per message (us): " + ", ".join(parts))

    row(bare)
    row(on_receipt, f"{on_receipt.rate / bare.rate:.0%} of bare")
    row(after_commit, f"{after_commit.over(on_receipt):.3f} of on receipt")
    if one is not None and two is not None:
        row(one, f"{one.rate / bare.rate:.0%} of bare")
        row(two, f"{two.over(one):.2f}x one process")
    stored = [m for m in (on_receipt, after_commit, one, two) if m is not None]
    for mode in stored:
        c = mode.counts
        shared = mode is two or mode is one
        peak = f", most unacknowledged at once {mode.peak_unacknowledged:,} of {INFLIGHT:,}"
        print(
            f"  {mode.label}: applied {c[store.APPLIED]:,}, superseded within a batch "
            f"{c[store.SUPERSEDED]:,}, out of order {c[store.OUT_OF_ORDER]:,}, "
            f"other rejections {_unexpected(c, shared):,}"
            + (peak if mode is not on_receipt else "")
        )
    bad = [f"{m.label}: {'; '.join(m.wrong)}" for m in stored if m.wrong]
    bad += [f"{m.label}: rejections" for m in stored if _unexpected(m.counts, m in (one, two))]
    print(
        "  after every storing round each device holds its last report (highest seq): "
        + ("NO: " + " | ".join(bad) if bad else "yes")
    )
    others = [s.get("other", 0.0) for m in (bare, on_receipt, after_commit) for s in m.cpu]
    if others and statistics.median(others) > 0.25:
        print(
            f"  processes outside this bench used {statistics.median(others):.2f} of the "
            f"{cores} cores (median): every rate is lower and noisier than on a quiet machine"
        )

    ratio = after_commit.over(on_receipt)
    verdict = "met" if ratio >= ACK_GOAL else "NOT met"
    print(
        f"  ack after commit / ack on receipt = {ratio:.3f} (median of the rounds' ratios); "
        f"goal >= {ACK_GOAL:.2f}: {verdict}"
    )
    if one is None or two is None:
        print(
            "  two evaluator processes in a shared group: skipped, the embedded broker has no "
            "shared subscriptions (set MQTT_URL to a Mosquitto)"
        )
        return
    scale = two.over(one)
    verdict = "met" if scale >= SHARED_GOAL else "NOT met"
    print(
        f"  two evaluators / one = {scale:.2f}x (median of the rounds' ratios); "
        f"goal >= {SHARED_GOAL:.1f}x: {verdict}"
    )
    # What besides the evaluators could hold the two back.
    ceiling = bare.rate / one.rate
    if two.rate >= 0.9 * bare.rate:
        print(
            f"  two evaluators reach {two.rate / bare.rate:.0%} of the bare subscriber: the "
            f"publishers and the broker are the bottleneck; the ratio cannot exceed "
            f"{ceiling:.2f}x here"
        )
    elif ceiling < SHARED_GOAL:
        print(
            f"  the bare subscriber takes only {ceiling:.2f}x what one evaluator does: the "
            f"publishers and the broker could not feed {SHARED_GOAL:.1f}x here either"
        )
    else:
        print(
            f"  the publishers are not the bottleneck: the bare subscriber takes {ceiling:.2f}x "
            f"what one evaluator does"
        )
    bounds = [_bound(mode, n, cores) for mode, n in ((one, 1), (two, 2))]
    if bounds[0] is not None and bounds[1] is not None:
        print(
            f"  on this machine with nothing else running, the CPU spent per message bounds "
            f"one evaluator to {bounds[0]:,.0f}/s and two to {bounds[1]:,.0f}/s: "
            f"{bounds[1] / bounds[0]:.2f}x"
        )
    busy = [s["machine"] for s in two.cpu if "machine" in s]
    if busy and statistics.median(busy) > 0.9 * cores:
        print(
            f"  the machine is CPU-bound during the two-evaluator rounds: "
            f"{statistics.median(busy):.2f} of {cores} cores busy, shared by PostgreSQL, the "
            f"broker, the publishers and the evaluators (see cores used above)"
        )


def _bound(mode: Mode, processes: int, cores: int) -> float | None:
    """The rate the CPU measured per message allows with the whole machine
    to this bench: each evaluator process gets at most one core, and all the
    bench's processes (PostgreSQL and the broker too) the machine's cores."""
    evaluators = mode.cost([g for g in mode.groups() if g.startswith("evaluator")])
    total = mode.cost(mode.groups())
    if not evaluators or not total:
        return None
    return min(processes * 1e6 / evaluators, cores * 1e6 / total)


if __name__ == "__main__":
    role = os.environ.get(_ROLE)
    if role == "publisher":
        _publisher()
    elif role == "evaluator":
        run(_evaluator_process)
    else:
        run(main)
