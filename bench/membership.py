"""Group membership watches under load: commit-to-event latency and memory,
and what the membership triggers cost the twin ingest.

One tenant with --devices devices (default 100,000), each with a ~2 KB
reported document that holds a small `bucket` field (device n is in bucket
n % 10). Ten dynamic groups, created through the typed client: group i is
the devices whose reported `bucket` EQUALS i. Once the server's maintainer
has evaluated them (group_memberships holds every member, nothing queued;
one GROUP_EDIT event per member) and group_memberships and membership_events
have been VACUUM ANALYZEd (as autovacuum soon would: it changes the watch's
plans, so it is done before the load rather than left to happen during it),
one stream per group without a cursor reads the current members up to its
first bookmark (timed), and 100 watchers (10 per group; raw streams, so the
bookmarks are seen too, on 10 channels from this process) resume from that
bookmark's cursor. Then 10,000 reports arrive over 10 s: 100 transactions a
second of 10 reports each, written by the evaluator's own statement
(`server.twin.store.ingest_reported` in a tenant transaction), each moving
a different device to another bucket, so that it LEFT one group and
ENTERED another: 20,000 events, each delivered to 10 watchers (200,000
deliveries). Measured in the same run:
  - the database's floor: commit to a raw LISTEN in this process (each
    report transaction also NOTIFYs a bench channel; the evaluator's own
    transactions do not);
  - pulse: commit (from just before COMMIT is sent, so the commit itself is
    included) to delivery to a watcher, matched by group, device and event;
    split into the wait for the maintainer (commit to the event's
    occurred_at, which is the maintainer transaction's now(), its start),
    the maintainer's pass (to its NOTIFY, heard here), and the watch hub,
    gRPC and this client (that NOTIFY to delivery);
  - the server's CPU during the load and its resident memory (idle with the
    watchers open; peak before the load, which covers evaluating the groups
    and streaming their current members; peak after).
Goals (the issue): p99 < 250 ms; server memory < 300 MB.

Then, with the server stopped (no maintainer competing for the machine or
draining the queue; membership_changes is emptied before every round), the
write cost of the membership triggers: the same ingest statement in a closed
loop (4 concurrent tenant transactions, the 10 dynamic groups present),
with the device_state trigger `membership_journal` disabled (the baseline)
and enabled, in alternating rounds, for transactions of 10 and of 500
reports. Ratios are medians of the ratios of rounds run back to back. Goal:
enabled >= 0.85 of disabled.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python -m bench.membership [--devices 100000] [--seconds 10]

Without DATABASE_URL, an embedded PostgreSQL. --devices 1000000 works; the
seeding and the groups' first evaluation then take minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import os
import random
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
from pulse.device.v1 import groups_pb2
from pulse_client import AsyncPulseClient

from bench.harness import closed_loop, free_port, run, scratch_database
from bench.watch import _cpu_s, _memory_kib, _percentile, subprocess_server
from server.auth import Role, mint_token
from server.db import Database, create_pool
from server.groups import membership_store
from server.twin import store

GROUPS = 10
PER_GROUP = 10  # watchers of each group
PER_TRANSACTION = 10
TRANSACTIONS_PER_S = 100
METRICS = 112  # numeric fields padding each reported document to ~2 KB
VARIANTS = 64
SEED = 8
FLOOR_CHANNEL = "bench_membership_floor"
WRITE_CONCURRENCY = 4
WRITE_BATCHES = (10, 500)
Response = groups_pb2.WatchGroupMembershipResponse
ENTERED, LEFT = Response.ENTERED, Response.LEFT


def _device_id(n: int) -> str:
    return f"M-{n:07d}"


def _group_id(bucket: int) -> str:
    return f"bucket-{bucket}"


def _filter(bucket: int) -> dict[str, object]:
    condition = {"document": "REPORTED", "path": "bucket", "operator": "EQUALS", "values": [bucket]}
    return {"twin_conditions": [condition]}


def _members(devices: int, bucket: int) -> int:
    return devices // GROUPS + (1 if bucket < devices % GROUPS else 0)


def _paddings() -> list[str]:
    """The body of a reported document after its bucket: a firmware version
    and METRICS readings (~2 KB of JSON), in VARIANTS variants."""
    rng = random.Random(SEED)
    return [
        f'"firmware": "2.{rng.randrange(20)}.{rng.randrange(50)}", '
        + ", ".join(f'"m{k:03d}": {rng.uniform(0, 10_000):.3f}' for k in range(METRICS))
        for _ in range(VARIANTS)
    ]


PADDINGS = _paddings()


def _document(bucket: int, n: int) -> str:
    """A reported document as JSON text; `n` makes it differ from any before."""
    return f'{{"bucket": {bucket}, "n": {n}, {PADDINGS[n % VARIANTS]}}}'


def _stats(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8} {'-':>8}"
    return (
        f"{statistics.median(values):8.1f} {_percentile(values, 0.9):8.1f}"
        f" {_percentile(values, 0.99):8.1f} {max(values):8.1f}"
    )


# -- seeding


async def seed(dsn: str, tenant: uuid.UUID, devices: int) -> tuple[float, float]:
    """The tenant's devices, device n with a reported document in bucket
    n % 10, generated inside PostgreSQL (a million 2 KB documents never pass
    through this process). As the schema owner, like bench/groups.py's COPY.
    Returns the mean stored and JSON-text sizes of a reported document."""
    con = await asyncpg.connect(dsn)
    try:
        async with con.transaction():
            await con.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant))
            await con.execute("INSERT INTO tenants (tenant_id, name) VALUES ($1, 'bench')", tenant)
            await con.execute(
                """
                INSERT INTO devices (tenant_id, device_id, name, model)
                SELECT $1, 'M-' || lpad(n::text, 7, '0'), 'meter ' || n, 'MTR-9'
                FROM generate_series(0, $2 - 1) n
                """,
                tenant,
                devices,
            )
            await con.execute(
                """
                INSERT INTO device_state (tenant_id, device_id, status, reported,
                                          reported_updated_at)
                SELECT $1, 'M-' || lpad(n::text, 7, '0'), 'ONLINE',
                       jsonb_build_object('bucket', n % 10, 'n', 0) || p.pad, now()
                FROM generate_series(0, $2 - 1) n
                JOIN unnest($3::text[]::jsonb[]) WITH ORDINALITY AS p (pad, k)
                  ON p.k = n % $4 + 1
                """,
                tenant,
                devices,
                ["{" + pad + "}" for pad in PADDINGS],
                VARIANTS,
            )
        await con.execute("VACUUM ANALYZE devices, device_state")
        sizes = await con.fetchrow(
            """
            SELECT avg(pg_column_size(reported))::float8 AS stored,
                   avg(octet_length(reported::text))::float8 AS text
            FROM (SELECT reported FROM device_state LIMIT 1000) s
            """
        )
        assert sizes is not None
        return sizes["stored"], sizes["text"]
    finally:
        await con.close()


async def evaluated(
    admin: asyncpg.Connection[asyncpg.Record], tenant: uuid.UUID, devices: int
) -> None:
    """Until the maintainer has stored every group's members and nothing is queued."""
    want = {_group_id(b): _members(devices, b) for b in range(GROUPS)}
    while True:
        queued = await admin.fetchval(
            "SELECT count(*) FROM membership_changes WHERE tenant_id = $1", tenant
        )
        if queued == 0:
            rows = await admin.fetch(
                """
                SELECT group_id, count(*) AS n FROM group_memberships
                WHERE tenant_id = $1 GROUP BY group_id
                """,
                tenant,
            )
            if {r["group_id"]: r["n"] for r in rows} == want:
                return
        await asyncio.sleep(0.5)


# -- watching


def _request(group_id: str, cursor: str = "") -> groups_pb2.WatchGroupMembershipRequest:
    return groups_pb2.WatchGroupMembershipRequest(group_id=group_id, resume_cursor=cursor)


async def first_cursor(client: AsyncPulseClient, group_id: str) -> tuple[str, int]:
    """A stream without a cursor read up to its first bookmark: that
    bookmark's cursor, and how many current members came before it."""
    stream = client._rpc.stream(client.groups._stub.WatchGroupMembership, _request(group_id))
    members = 0
    async with stream:
        async for message in stream:
            if message.event_type == Response.EVENT_TYPE_UNSPECIFIED:
                return message.cursor, members
            members += 1
    raise RuntimeError(f"the stream of {group_id} ended before its first bookmark")


@dataclass
class Delivery:
    group_id: str
    device_id: str
    event_type: int
    cause: int
    at: float  # arrival here, time.time()
    occurred_at: float


@dataclass
class Watchers:
    """Every watch stream of the run, recording what each event delivered."""

    total: int
    received: list[Delivery] = field(default_factory=list)
    expected: int = 2**62
    ready: int = 0
    errors: list[BaseException] = field(default_factory=list)
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    all_received: asyncio.Event = field(default_factory=asyncio.Event)

    async def watch(self, client: AsyncPulseClient, group_id: str, cursor: str) -> None:
        request = _request(group_id, cursor)
        bookmarked = False
        try:
            async with client._rpc.stream(
                client.groups._stub.WatchGroupMembership, request
            ) as stream:
                async for message in stream:
                    if message.event_type != Response.EVENT_TYPE_UNSPECIFIED:
                        at = message.occurred_at
                        self.received.append(
                            Delivery(
                                group_id,
                                message.device_id,
                                message.event_type,
                                message.cause,
                                time.time(),
                                at.seconds + at.nanos / 1e9,
                            )
                        )
                        if len(self.received) >= self.expected:
                            self.all_received.set()
                    elif not bookmarked:
                        bookmarked = True
                        self.ready += 1
                        if self.ready == self.total:
                            self.all_ready.set()
        except Exception as error:
            self.errors.append(error)
            raise

    def expect(self, count: int) -> None:
        self.expected = count
        if len(self.received) >= count:
            self.all_received.set()


@contextlib.asynccontextmanager
async def watching(clients: list[AsyncPulseClient], cursors: list[str]) -> AsyncIterator[Watchers]:
    """PER_GROUP streams of every group, each past its first bookmark."""
    state = Watchers(total=GROUPS * PER_GROUP)
    tasks = [
        asyncio.create_task(state.watch(clients[b], _group_id(b), cursors[b]))
        for b in range(GROUPS)
        for _ in range(PER_GROUP)
    ]
    try:
        await asyncio.wait_for(state.all_ready.wait(), 120)
        yield state
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the load


@dataclass(frozen=True, slots=True)
class Move:
    device_id: str
    old: int
    new: int


def moves(devices: int, count: int) -> list[Move]:
    """`count` different devices, each to a bucket other than its own."""
    rng = random.Random(SEED)
    picked = rng.sample(range(devices), count)
    return [
        Move(_device_id(n), n % GROUPS, (n + 1 + rng.randrange(GROUPS - 1)) % GROUPS)
        for n in picked
    ]


async def paced(count: int, seconds: float, emit: Callable[[int], Awaitable[None]]) -> None:
    start = time.perf_counter()
    for k in range(count):
        delay = start + k * seconds / count - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await emit(k)


@dataclass
class LoadOutcome:
    reports: int
    applied: int
    written_s: float
    deliveries: list[Delivery]
    expected: int
    commit_at: dict[tuple[str, str, int], float]
    floor_ms: list[float]
    notified: list[float]
    cpu_s: float
    bench_cpu_s: float
    idle_kib: int
    hwm_before_kib: int
    peak_kib: int
    errors: list[BaseException]


async def load(
    dsn: str,
    tenant: uuid.UUID,
    pid: int,
    clients: list[AsyncPulseClient],
    cursors: list[str],
    devices: int,
    seconds: float,
) -> LoadOutcome:
    count = int(seconds * TRANSACTIONS_PER_S)
    plan = moves(devices, count * PER_TRANSACTION)
    batches = [plan[k * PER_TRANSACTION : (k + 1) * PER_TRANSACTION] for k in range(count)]
    db = Database(await create_pool(dsn, size=2))
    listen = await asyncpg.connect(dsn)
    floor_at: dict[int, float] = {}
    notified: list[float] = []
    await listen.add_listener(
        FLOOR_CHANNEL, lambda _c, _p, _ch, payload: floor_at.__setitem__(int(payload), time.time())
    )
    await listen.add_listener(membership_store.CHANNEL, lambda *_: notified.append(time.time()))
    committed: dict[int, float] = {}
    commit_at: dict[tuple[str, str, int], float] = {}
    applied = 0
    try:
        async with watching(clients, cursors) as state:
            idle = _memory_kib(pid, "VmRSS")
            hwm_before = _memory_kib(pid, "VmHWM")

            async def emit(k: int) -> None:
                nonlocal applied
                reports = [
                    store.Report(m.device_id, _document(m.new, k + 1), desired_version=0)
                    for m in batches[k]
                ]
                async with db.tenant(tenant) as con:
                    result = await store.ingest_reported(con, tenant, reports)
                    await con.execute("SELECT pg_notify($1, $2)", FLOOR_CHANNEL, str(k))
                    at = time.time()  # just before COMMIT is sent
                committed[k] = at
                applied += result.outcomes.count(store.APPLIED)
                for m in batches[k]:
                    commit_at[(_group_id(m.old), m.device_id, LEFT)] = at
                    commit_at[(_group_id(m.new), m.device_id, ENTERED)] = at

            cpu, bench_cpu = _cpu_s(pid), _cpu_s(os.getpid())
            t0 = time.perf_counter()
            await paced(count, seconds, emit)
            written = time.perf_counter() - t0
            state.expect(len(commit_at) * PER_GROUP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.all_received.wait(), 60)
            await asyncio.sleep(0.5)  # anything beyond what was expected
            cpu, bench_cpu = _cpu_s(pid) - cpu, _cpu_s(os.getpid()) - bench_cpu
            peak = _memory_kib(pid, "VmHWM")
            received = list(state.received)
            errors = list(state.errors)
            expected = state.expected
    finally:
        await listen.close()
        await db.close()
    floor = [(floor_at[k] - c) * 1000 for k, c in committed.items() if k in floor_at]
    return LoadOutcome(
        reports=len(plan),
        applied=applied,
        written_s=written,
        deliveries=received,
        expected=expected,
        commit_at=commit_at,
        floor_ms=floor,
        notified=sorted(notified),
        cpu_s=cpu,
        bench_cpu_s=bench_cpu,
        idle_kib=idle,
        hwm_before_kib=hwm_before,
        peak_kib=peak,
        errors=errors,
    )


def report_load(out: LoadOutcome, devices: int, seconds: float) -> None:
    total: list[float] = []
    wait: list[float] = []
    passing: list[float] = []
    hub: list[float] = []
    unexpected = wrong_cause = 0
    per_key: dict[tuple[str, str, int], int] = {}
    for d in out.deliveries:
        key = (d.group_id, d.device_id, d.event_type)
        commit = out.commit_at.get(key)
        if commit is None:
            unexpected += 1
            continue
        per_key[key] = per_key.get(key, 0) + 1
        if d.cause != Response.TWIN:
            wrong_cause += 1
        total.append((d.at - commit) * 1000)
        wait.append((d.occurred_at - commit) * 1000)
        # The maintainer's NOTIFY: the first heard after its pass began.
        i = bisect.bisect_left(out.notified, d.occurred_at)
        if i < len(out.notified) and out.notified[i] <= d.at:
            passing.append((out.notified[i] - d.occurred_at) * 1000)
            hub.append((d.at - out.notified[i]) * 1000)
    passes = len({d.occurred_at for d in out.deliveries})
    missing = sum(max(0, PER_GROUP - per_key.get(k, 0)) for k in out.commit_at)
    repeated = sum(max(0, n - PER_GROUP) for n in per_key.values())

    print(
        f"  load: {out.reports:,} reports ({out.applied:,} applied) in "
        f"{int(seconds * TRANSACTIONS_PER_S):,} transactions, written over {out.written_s:.1f} s;"
        f" {len(out.commit_at):,} events in {passes:,} maintainer passes"
    )
    print(f"  {'':<44} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  {'count':>9}")
    rows = [
        ("commit -> raw LISTEN (database floor)", out.floor_ms),
        ("commit -> maintainer pass starts", wait),
        ("  pass start -> its NOTIFY heard here", passing),
        ("  NOTIFY -> watcher (hub, gRPC, client)", hub),
        ("pulse: commit -> watcher", total),
    ]
    for name, values in rows:
        print(f"  {name:<44} {_stats(values)}  {len(values):9,}")
    floor = statistics.median(out.floor_ms) if out.floor_ms else 0.0
    if total and floor:
        print(f"  pulse p50 / floor p50: {statistics.median(total) / floor:.1f}x")
    print(
        f"  delivered {len(total):,}/{out.expected:,}; missing {missing:,}, repeated {repeated:,},"
        f" unexpected {unexpected:,}, cause other than TWIN {wrong_cause:,};"
        f" stream errors {len(out.errors)}"
    )
    for error in out.errors[:3]:
        print(f"    {error!r}")
    per = out.cpu_s / max(1, len(total)) * 1e6
    print(
        f"  CPU during the load: server {out.cpu_s:.1f} s ({per:.0f} us per delivery),"
        f" this process {out.bench_cpu_s:.1f} s;\n  server RSS: idle {out.idle_kib / 1024:.0f} MB,"
        f" peak before the load"
        f" {out.hwm_before_kib / 1024:.0f} MB, peak {out.peak_kib / 1024:.0f} MB"
    )
    if total:
        p99 = _percentile(total, 0.99)
        p99_ok = "met" if p99 < 250 and not missing else "NOT met"
        mem_ok = "met" if out.peak_kib < 300 * 1024 else "NOT met"
        print(
            f"  goals: p99 < 250 ms: {p99_ok} ({p99:.0f} ms); "
            f"peak memory < 300 MB: {mem_ok} ({out.peak_kib / 1024:.0f} MB)"
        )


# -- the triggers' write cost


@dataclass(frozen=True, slots=True)
class WriteRow:
    batch: int
    enabled: bool
    rate: float  # reports per second
    p50_ms: float


async def write_cost(
    dsn: str, tenant: uuid.UUID, devices: int, seconds: float, rounds: int
) -> tuple[list[WriteRow], dict[int, float]]:
    db = Database(await create_pool(dsn, size=WRITE_CONCURRENCY))
    admin = await asyncpg.connect(dsn)
    numbers = itertools.count(1_000_000)
    rows: list[WriteRow] = []
    ratios: dict[int, float] = {}
    try:
        for batch in WRITE_BATCHES:
            blocks = max(1, devices // batch)

            async def call(i: int, batch: int = batch, blocks: int = blocks) -> None:
                n = next(numbers)
                start = (i % blocks) * batch
                reports = [
                    store.Report(_device_id(d), _document((d + n) % GROUPS, n), desired_version=0)
                    for d in range(start, start + batch)
                ]
                async with db.tenant(tenant) as con:
                    await store.ingest_reported(con, tenant, reports)

            rates: dict[bool, list[float]] = {False: [], True: []}
            p50s: dict[bool, list[float]] = {False: [], True: []}
            pairs: list[float] = []
            for r in range(rounds):
                pair: dict[bool, float] = {}
                for enabled in (False, True) if r % 2 == 0 else (True, False):
                    switch = "ENABLE" if enabled else "DISABLE"
                    await admin.execute(
                        f"ALTER TABLE device_state {switch} TRIGGER membership_journal"
                    )
                    await admin.execute("TRUNCATE membership_changes")
                    result = await closed_loop(
                        "ingest",
                        call,
                        concurrency=WRITE_CONCURRENCY,
                        seconds=seconds,
                        warmup=0.5,
                        rounds=1,
                    )
                    pair[enabled] = result.rate * batch
                    rates[enabled].append(result.rate * batch)
                    p50s[enabled].append(result.p50_ms)
                pairs.append(pair[True] / pair[False])
            for enabled in (False, True):
                rows.append(
                    WriteRow(
                        batch,
                        enabled,
                        statistics.median(rates[enabled]),
                        statistics.median(p50s[enabled]),
                    )
                )
            ratios[batch] = statistics.median(pairs)
    finally:
        await admin.execute("ALTER TABLE device_state ENABLE TRIGGER membership_journal")
        await admin.execute("TRUNCATE membership_changes")
        await admin.close()
        await db.close()
    return rows, ratios


def report_write_cost(rows: list[WriteRow], ratios: dict[int, float], rounds: int) -> None:
    print(
        f"\nmembership triggers' write cost: store.ingest_reported, {WRITE_CONCURRENCY} concurrent"
        f" tenant transactions, ~2 KB reports,\n  10 dynamic groups, server stopped,"
        f" membership_changes emptied before each round; medians of {rounds} alternating rounds"
    )
    print(f"  {'':<38} {'reports/s':>10} {'p50 ms/txn':>11}  enabled/disabled")
    for row in rows:
        name = f"{row.batch} per txn, trigger {'enabled' if row.enabled else 'disabled'}"
        line = f"  {name:<38} {row.rate:10,.0f} {row.p50_ms:11.2f}"
        if row.enabled:
            ratio = ratios[row.batch]
            line += f"  {ratio:.2f} (goal >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})"
        print(line)


# -- the run


async def main(devices: int, seconds: float, write_seconds: float, rounds: int) -> None:
    async with scratch_database() as dsn:
        tenant = uuid.uuid4()
        t0 = time.perf_counter()
        stored, text = await seed(dsn, tenant, devices)
        seeded = time.perf_counter() - t0
        secret = secrets.token_hex(32)
        port = free_port()
        env = {
            "DATABASE_URL": dsn,
            "PULSE_SECRET": secret,
            "PULSE_DB_POOL_SIZE": "10",
            "PULSE_LOG_LEVEL": "WARNING",
            "PORT": str(port),
        }
        address = f"127.0.0.1:{port}"
        admin = await asyncpg.connect(dsn)
        async with subprocess_server(["bench.serve"], env) as pid:
            operator = mint_token(secret.encode(), tenant_id=tenant, role=Role.OPERATOR)
            owner = await AsyncPulseClient.connect(address, token=operator, timeout=60)
            # One channel and caller (token subject) per group, like 10 applications.
            clients = [
                await AsyncPulseClient.connect(
                    address,
                    token=mint_token(
                        secret.encode(), tenant_id=tenant, role=Role.VIEWER, subject=f"app-{b}"
                    ),
                    timeout=60,
                )
                for b in range(GROUPS)
            ]
            try:
                t0 = time.perf_counter()
                for b in range(GROUPS):
                    await owner.groups.create_dynamic(
                        f"bucket {b}", _filter(b), group_id=_group_id(b)
                    )
                await asyncio.wait_for(evaluated(admin, tenant, devices), 1800)
                evaluation = time.perf_counter() - t0
                made = await admin.fetchrow(
                    "SELECT count(DISTINCT occurred_at) AS passes, count(*) AS events"
                    " FROM membership_events WHERE tenant_id = $1",
                    tenant,
                )
                assert made is not None
                passes, created = made["passes"], made["events"]
                # What autovacuum would do soon after a million inserted rows;
                # done now so that it does not run during the load.
                t0 = time.perf_counter()
                await admin.execute("VACUUM ANALYZE group_memberships, membership_events")
                vacuumed = time.perf_counter() - t0
                t0 = time.perf_counter()
                firsts = await asyncio.gather(
                    *(first_cursor(clients[b], _group_id(b)) for b in range(GROUPS))
                )
                snapshot = time.perf_counter() - t0
                cursors = [cursor for cursor, _ in firsts]
                streamed = [n for _, n in firsts]
                outcome = await load(dsn, tenant, pid, clients, cursors, devices, seconds)
            finally:
                for client in [owner, *clients]:
                    await client.close()
        await admin.close()

        print(
            f"membership: {devices:,} devices in one tenant (reported ~{text / 1024:.1f} KB as"
            f" JSON, {stored:,.0f} B stored), {GROUPS} dynamic groups (reported `bucket`"
            f" EQUALS i),\n  {PER_GROUP} watchers each; {PER_TRANSACTION} reports per"
            f" transaction, {TRANSACTIONS_PER_S}/s for {seconds:.0f} s; LEFT + ENTERED to"
            f" {PER_GROUP} watchers each"
        )
        members = sum(streamed)
        want = sum(_members(devices, b) for b in range(GROUPS))
        print(
            f"  setup: seeded in {seeded:.0f} s; groups created and evaluated by the maintainer"
            f" in {evaluation:.1f} s ({created:,} GROUP_EDIT events in {passes} passes);"
            f"\n  memberships and events vacuumed in {vacuumed:.1f} s; current members of the"
            f" {GROUPS} groups streamed\n  to their first bookmarks (concurrently) in"
            f" {snapshot:.1f} s ({members:,}/{want:,})"
        )
        report_load(outcome, devices, seconds)

        rows, ratios = await write_cost(dsn, tenant, devices, write_seconds, rounds)
        report_write_cost(rows, ratios, rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="of membership-changing load")
    parser.add_argument(
        "--write-seconds", type=float, default=3.0, help="per round of the trigger-cost loop"
    )
    parser.add_argument("--rounds", type=int, default=4, help="of the trigger-cost loop, per mode")
    args = parser.parse_args()
    reports = int(args.seconds * TRANSACTIONS_PER_S) * PER_TRANSACTION
    least = max(reports, max(WRITE_BATCHES) * WRITE_CONCURRENCY)
    if args.devices < least:
        parser.error(f"--devices must be at least {least:,} (one report per device)")
    run(lambda: main(args.devices, args.seconds, args.write_seconds, args.rounds))
