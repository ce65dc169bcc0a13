"""Twin queries over a million devices with ~2 KB reported documents: pages
and counts of filters on the reported document, through the real server and
typed client, three ways in one run:
  - a dynamic group (ListGroupMembers, read from the membership the
    maintainer keeps; the time the maintainer took to evaluate the new
    groups is printed too),
  - PreviewFilter with the same filter (evaluated whole over devices and
    device_state),
  - the same filter SQL through raw asyncpg in a tenant scope (what
    PreviewFilter runs, without gRPC or auth), beside a raw primary-key read
    of one device as the floor.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python -m bench.twin_query

BENCH_TWIN_DEVICES overrides the fleet size (default 1,000,000; a smaller
fleet measures a shallower deep page), BENCH_TWIN_SAMPLES the samples per
median (default 25; calls slower than 0.2 s take 5, slower than 3 s 3), and
BENCH_TWIN_EXPLAIN=1 prints the plans of PreviewFilter's pages. The fleet
(bench/groups.py's devices, each with a reported document) is loaded with
COPY into a scratch database, dropped at the end. PreviewFilter's deep page
token is walked to when that is quick, else sealed (_preview_deep_token).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf import json_format
from pulse.device.v1 import filter_pb2, groups_pb2
from pulse_client import AsyncPulseClient

from bench.groups import (
    DEEP_PAGE,
    PAGE,
    STATE_COLUMNS,
    Raw,
    Row,
    _evaluated,
    _token_at_page,
    offset_sql,
    timed,
)
from bench.groups import build as groups_build
from bench.harness import free_port, run, scratch_database, subprocess_server
from server import filters
from server.auth import Role, mint_token
from server.db import Database, create_pool
from server.groups import store
from server.pagination import PageTokens

DEVICES = int(os.environ.get("BENCH_TWIN_DEVICES", "1000000"))
SAMPLES = 25
SEED = 11
# A call slower than this is measured with fewer samples (see _timed).
SLOW_S = 0.2
SLOW_SAMPLES = 5
VERY_SLOW_S = 3.0
# The client's deadline for one call: a count of a twin condition scans the fleet.
DEADLINE_S = 900.0
TAILS = 4096
# Longest walk through PreviewFilter pages towards page DEEP (see _preview_deep_token).
WALK_BUDGET_S = 60.0
GOAL_MS = 10.0
# The deep page: page 1,000, or for a small fleet (a trial run) the last
# page the broad filter surely has.
DEEP = max(2, min(DEEP_PAGE, DEVICES * 25 // 100 // PAGE))

# The filters measured. Shares follow from _reported() and _twin(), times the
# 98% of devices that are active (bench/groups.py's fleet).
RARE_VERSION = "2.4.0-rc1"
SELECTIVE: dict[str, object] = {  # ~0.1%
    "twin_conditions": [
        {
            "document": "REPORTED",
            "path": "fw.version",
            "operator": "EQUALS",
            "values": [RARE_VERSION],
        }
    ]
}
BROAD: dict[str, object] = {  # ~30%
    "twin_conditions": [
        {"document": "REPORTED", "path": "mode", "operator": "EQUALS", "values": ["eco"]}
    ]
}
# Devices that were given a desired document and have not applied it (~10%).
BEHIND: dict[str, object] = {
    "sync_statuses": ["STALE"],
    "twin_conditions": [{"document": "DESIRED", "path": "mode", "operator": "EXISTS"}],
}

_MODES = ("eco", "comfort", "boost", "off")
_MODE_WEIGHTS = (30, 45, 15, 10)
_WEEK = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RESETS = ("POWER_ON", "WATCHDOG", "OTA", "BROWNOUT", "SOFTWARE")
_ERRORS = (None, None, None, "E_SENSOR_TIMEOUT", "E_MQTT_RECONNECT", "E_FLASH_CRC")
_SENSORS = (("t", "C", 15.0, 15.0), ("rh", "%", 20.0, 60.0), ("co2", "ppm", 400.0, 1200.0))
_SENSORS_MORE = (("lux", "lx", 0.0, 900.0), ("p", "hPa", 980.0, 50.0), ("voc", "ppb", 0.0, 500.0))


def _head(rng: random.Random, mode: str | None = None) -> tuple[str, str]:
    """The device's own part of a reported document, as compact JSON members
    (no braces), and its mode: fw.version is RARE_VERSION for 0.1% of
    devices, mode is "eco" for 30%, battery is uniform in 0..100 (so
    `battery LESS 30` keeps 30%)."""
    r = rng.random
    version = RARE_VERSION if r() < 0.001 else f"2.3.{int(r() * 15)}"
    if mode is None:
        mode = rng.choices(_MODES, _MODE_WEIGHTS)[0]
    # Written out rather than json.dumps'd: a million of these are made.
    channel = "beta" if r() < 0.05 else "stable"
    head = (
        f'"fw":{{"version":"{version}","channel":"{channel}",'
        f'"build":"{rng.getrandbits(32):08x}","bootloader":"1.0.{int(r() * 6)}",'
        f'"modem":"BG95-M3 rev {int(r() * 20):02d}"}},'
        f'"mode":"{mode}","battery":{int(r() * 101)},"rssi":{-40 - int(r() * 55)},'
        f'"uptime_s":{int(r() * 4e6)},'
        f'"counters":{{"tx_msgs":{int(r() * 1e6)},"rx_msgs":{int(r() * 1e5)},'
        f'"tx_bytes":{int(r() * 1e8)},"rx_bytes":{int(r() * 1e7)},'
        f'"reconnects":{int(r() * 50)}}}'
    )
    return head, mode


def _tail(rng: random.Random) -> str:
    """The rest of a thermostat-like reported document (sensors, network,
    config, diagnostics, ...) as compact JSON members: with the head, about
    2,000 characters. Generating one per device would take minutes for a
    million, so devices draw theirs from a pool of TAILS (each row is
    still stored and compressed on its own)."""
    r = rng.random
    sensors = {
        name: {"value": round(low + r() * span, 1), "unit": unit, "ok": r() > 0.01}
        for name, unit, low, span in _SENSORS + _SENSORS_MORE
    }
    tail = {
        "sensors": sensors,
        "network": {
            "ip": f"10.{int(r() * 256)}.{int(r() * 256)}.{int(r() * 254) + 1}",
            "gateway": "10.0.0.1",
            "mac": "02:" + ":".join(f"{int(r() * 256):02x}" for _ in range(5)),
            "ssid": f"plant-iot-{int(r() * 400):03d}",
            "channel": 1 + int(r() * 13),
            "tx_power_dbm": 20,
        },
        "valves": {
            f"v{i}": {
                "position_pct": int(r() * 101),
                "cycles": int(r() * 1e5),
                "state": "open" if r() < 0.5 else "closed",
            }
            for i in range(1, 4)
        },
        "power": {
            "source": "battery" if r() < 0.8 else "mains",
            "voltage_mv": 2800 + int(r() * 800),
            "charging": r() < 0.1,
            "solar_mw": int(r() * 500),
        },
        "clock": {"tz": "Europe/Berlin", "ntp_ok": r() > 0.02, "drift_ms": int(r() * 200) - 100},
        "location": {
            "lat": round(48 + r() * 4, 6),
            "lon": round(8 + r() * 6, 6),
            "floor": int(r() * 6),
            "room": f"R{int(r() * 300):03d}",
        },
        "config": {
            "setpoint_c": 18 + int(r() * 8),
            "hysteresis_c": 0.5,
            "report_interval_s": 60,
            "heartbeat_s": 30,
            "alarm": {
                "enabled": True,
                "high_c": 28,
                "low_c": 5,
                "high_rh_pct": 80,
                "low_battery_pct": 15,
            },
            "schedule": {
                day: {
                    "on": f"{5 + int(r() * 3):02d}:00",
                    "off": f"{20 + int(r() * 3):02d}:00",
                    "setpoint_c": 20,
                }
                for day in _WEEK
            },
            "features": {
                "ota": True,
                "ble": r() < 0.5,
                "debug_log": r() < 0.05,
                "frost_guard": True,
                "window_detect": r() < 0.7,
                "eco_boost": False,
            },
            "calibration": {
                "t_offset_c": round(r() - 0.5, 2),
                "rh_offset_pct": round(2 * r() - 1, 2),
                "co2_offset_ppm": int(r() * 40) - 20,
            },
            "ota": {"window": "02:00-04:00", "allow_beta": False, "max_retries": 3},
        },
        "diagnostics": {
            "reset_reason": rng.choice(_RESETS),
            "last_error": rng.choice(_ERRORS),
            "errors_24h": int(r() * 4),
            "heap_free": 20000 + int(r() * 40000),
            "flash_writes": int(r() * 1e6),
            "tasks": {"net": int(r() * 100), "sense": int(r() * 100), "ctl": int(r() * 100)},
        },
    }
    return json.dumps(tail, separators=(",", ":"))[1:-1]


@dataclass
class DocStats:
    count: int = 0
    reported_chars: int = 0
    desired: int = 0

    @property
    def mean_chars(self) -> float:
        return self.reported_chars / max(1, self.count)


def _twin(
    states: list[tuple[object, ...]], stats: DocStats, now: datetime
) -> Iterator[tuple[object, ...]]:
    """bench/groups.py's state rows with twin documents, generated as COPY
    consumes them (a million 2 KB documents are not held at once).

    40% of devices acknowledged a desired document equal to their report
    (SYNCED), 10% were given one they have not applied, over 5 minutes ago
    (STALE), 50% were never given one (desired {} at version 0).
    """
    rng = random.Random(SEED)
    tails = [_tail(rng) for _ in range(TAILS)]
    for tenant, device_id, status, seen in states:
        head, mode = _head(rng)
        reported = "{" + head + "," + rng.choice(tails) + "}"
        stats.count += 1
        stats.reported_chars += len(reported)
        assert seen is None or isinstance(seen, datetime)
        reported_at = seen or now - timedelta(days=30, seconds=rng.randint(0, 86400))
        version = rng.randint(1, 20)
        u = rng.random()
        if u < 0.4:
            desired, desired_version, acked = reported, version, version
            desired_at: datetime | None = reported_at - timedelta(seconds=rng.randint(1, 86400))
        elif u < 0.5:
            # Another mode and other settings (another tail).
            other, _ = _head(rng, "comfort" if mode == "eco" else "eco")
            desired = "{" + other + "," + rng.choice(tails) + "}"
            desired_version, acked = version, version - 1
            desired_at = now - timedelta(seconds=rng.randint(3600, 7 * 86400))
        else:
            desired, desired_version, acked, desired_at = "{}", 0, 0, None
        stats.desired += desired != "{}"
        yield (
            tenant,
            device_id,
            status,
            seen,
            reported,
            acked,
            reported_at,
            desired,
            desired_version,
            desired_at,
        )


# The device_state columns of _twin's rows.
_TWIN_COLUMNS = (
    *STATE_COLUMNS,
    "reported",
    "reported_version",
    "reported_updated_at",
    "desired",
    "desired_version",
    "desired_updated_at",
)


async def build(dsn: str, tenant: uuid.UUID, n: int = DEVICES) -> tuple[DocStats, list[str]]:
    """bench/groups.py's fleet with twin documents in device_state. Returns
    the documents' statistics and a sample of device ids."""
    stats = DocStats()
    now = datetime.now(UTC)
    fleet = await groups_build(
        dsn,
        tenant,
        n,
        states=lambda rows: _twin(rows, stats, now),
        state_columns=_TWIN_COLUMNS,
    )
    return stats, [str(row[1]) for row in fleet.devices[:: max(1, n // 1000)]]


async def _storage(dsn: str) -> str:
    con = await asyncpg.connect(dsn)
    try:
        row = await con.fetchrow(
            """
            SELECT pg_size_pretty(pg_table_size('device_state')) AS heap,
                   pg_size_pretty(pg_total_relation_size(
                       (SELECT reltoastrelid FROM pg_class WHERE oid = 'device_state'::regclass)
                   )) AS toast,
                   (SELECT avg(pg_column_size(reported))::int
                    FROM (SELECT reported FROM device_state LIMIT 10000) s) AS stored
            """
        )
    finally:
        await con.close()
    assert row is not None
    return (
        f"device_state {row['heap']} (of which TOAST {row['toast']}),"
        f" a reported document takes {row['stored']} bytes stored"
    )


# --------------------------------------------------------------------------
# Measuring


async def _timed(call: Callable[[], Awaitable[object]], samples: int) -> float:
    """bench.groups.timed, or for a call slower than SLOW_S (a scan of the
    fleet) the median of SLOW_SAMPLES after one warm-up (of 3 for a call
    slower than VERY_SLOW_S)."""
    t0 = time.perf_counter()
    await call()
    first = time.perf_counter() - t0
    if first < SLOW_S:
        return await timed(call, samples)
    times: list[float] = []
    for _ in range(min(samples, SLOW_SAMPLES if first < VERY_SLOW_S else 3)):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _message(f: dict[str, object]) -> filter_pb2.DeviceFilter:
    return json_format.ParseDict(f, filter_pb2.DeviceFilter())


async def _preview_deep_token(
    client: AsyncPulseClient, tenant: uuid.UUID, secret: bytes, cursor: str
) -> str:
    """The page token of the broad filter's page DEEP.

    Walked page by page like _token_at_page, for at most WALK_BUDGET_S: when
    pages cost seconds, or grow with their depth, the walk would take hours.
    The token is then sealed here, with the server's secret, around the
    device id page DEEP starts after (`cursor`): the token the walk would
    have ended with. The sealing is checked first: a token sealed around the
    last member of the last page walked must fetch what the server's own
    token for the next page fetches.
    """
    message = _message(BROAD)

    async def fetch(token: str) -> groups_pb2.PreviewFilterResponse:
        return await client.groups.preview_page(
            groups_pb2.PreviewFilterRequest(query_filter=message, page_size=PAGE, page_token=token)
        )

    token, last, page, page_ms = "", "", 0, 0.0
    t0 = time.perf_counter()
    while page < DEEP - 1:
        t1 = time.perf_counter()
        response = await fetch(token)
        page, page_ms = page + 1, (time.perf_counter() - t1) * 1000
        token, last = response.next_page_token, response.members[-1].device_id
        assert token, "the filter selects fewer pages than asked for"
        if time.perf_counter() - t0 > WALK_BUDGET_S:
            break
    if page == DEEP - 1:
        return token

    parsed = filters.parse_filter(BROAD)
    listing = PageTokens(secret).listing("filter-preview", tenant, filters.canonical_text(parsed))

    def seal(after: str) -> str:
        return listing.tokens.seal(
            kind=listing.kind, tenant_id=tenant, request=listing.request, key=[after]
        )

    walked, sealed = await fetch(token), await fetch(seal(last))
    assert walked.members and [m.device_id for m in walked.members] == [
        m.device_id for m in sealed.members
    ], "a sealed token fetched another page"
    print(
        f"PreviewFilter page {DEEP:,}: the walk stopped at page {page:,} after"
        f" {time.perf_counter() - t0:.0f} s (that page took {page_ms:.0f} ms);"
        " its token was sealed around the cursor instead"
    )
    return seal(cursor)


async def _measure_preview(
    client: AsyncPulseClient, rows: dict[str, Row], samples: int, deep: str
) -> None:
    selective, broad, behind = (_message(f) for f in (SELECTIVE, BROAD, BEHIND))

    def page(
        f: filter_pb2.DeviceFilter, token: str = "", total: bool = False, size: int = PAGE
    ) -> Callable[[], Awaitable[object]]:
        request = groups_pb2.PreviewFilterRequest(
            query_filter=f, page_size=size, page_token=token, include_total=total
        )
        return lambda: client.groups.preview_page(request)

    rows["sel1"].raw = await _timed(page(selective), samples)
    rows["broad1"].raw = await _timed(page(broad), samples)
    rows["deep"].raw = await _timed(page(broad, deep), samples)
    rows["behind1"].raw = await _timed(page(behind), samples)
    rows["selcount"].raw = await _timed(page(selective, total=True, size=1), samples)
    rows["broadcount"].raw = await _timed(page(broad, total=True, size=1), samples)


async def _measure_groups(
    client: AsyncPulseClient, dsn: str, tenant: uuid.UUID, rows: dict[str, Row], samples: int
) -> dict[str, int]:
    t0 = time.perf_counter()
    groups = {
        "selective": await client.groups.create_dynamic("rare firmware", SELECTIVE),
        "broad": await client.groups.create_dynamic("eco mode", BROAD),
        "behind": await client.groups.create_dynamic("desired not applied", BEHIND),
    }
    await _evaluated(dsn, tenant)
    print(f"the maintainer evaluated the 3 new groups in {time.perf_counter() - t0:.1f} s")
    selective, broad, behind = (g.group_id for g in groups.values())
    deep = await _token_at_page(client, broad, DEEP)

    def request(
        group_id: str, token: str = "", total: bool = False, size: int = PAGE
    ) -> groups_pb2.ListGroupMembersRequest:
        return groups_pb2.ListGroupMembersRequest(
            group_id=group_id, page_size=size, page_token=token, include_total=total
        )

    def page(
        group_id: str, token: str = "", total: bool = False, size: int = PAGE
    ) -> Callable[[], Awaitable[object]]:
        r = request(group_id, token, total, size)
        return lambda: client.groups.members_page(r)

    rows["sel1"].grpc = await _timed(page(selective), samples)
    rows["broad1"].grpc = await _timed(page(broad), samples)
    rows["deep"].grpc = await _timed(page(broad, deep), samples)
    rows["behind1"].grpc = await _timed(page(behind), samples)
    rows["selcount"].grpc = await _timed(page(selective, total=True, size=1), samples)
    rows["broadcount"].grpc = await _timed(page(broad, total=True, size=1), samples)
    totals: dict[str, int] = {}
    for name, group in groups.items():
        response = await client.groups.members_page(request(group.group_id, total=True, size=1))
        totals[name] = response.total
    return totals


async def _deep_cursor(raw: Raw) -> str:
    """The last member of the broad filter's page DEEP - 1, where page DEEP starts."""
    compiled = store.compile_members_filter(filters.parse_filter(BROAD), first_param=4)
    async with raw.db.tenant(raw.tenant, readonly=True) as con:
        cursor = await con.fetchval(
            offset_sql(compiled, "d.device_id"),
            raw.tenant,
            PAGE * (DEEP - 1) - 1,
            1,
            *compiled.params,
        )
    assert cursor is not None, f"the broad filter selects fewer than {DEEP:,} pages"
    return str(cursor)


async def _measure_raw(
    raw: Raw, rows: dict[str, Row], samples: int, cursor: str, device_ids: list[str]
) -> dict[str, str]:
    selective, broad, behind = (filters.parse_filter(f) for f in (SELECTIVE, BROAD, BEHIND))
    rows["sel1"].offset = await _timed(lambda: raw.page(selective, ""), samples)
    rows["broad1"].offset = await _timed(lambda: raw.page(broad, ""), samples)
    rows["deep"].offset = await _timed(lambda: raw.page(broad, cursor), samples)
    rows["behind1"].offset = await _timed(lambda: raw.page(behind, ""), samples)
    rows["selcount"].offset = await _timed(lambda: raw.count(selective), samples)
    rows["broadcount"].offset = await _timed(lambda: raw.count(broad), samples)

    calls = 0

    async def read_one() -> object:
        nonlocal calls
        calls += 1
        async with raw.db.tenant(raw.tenant, readonly=True) as con:
            return await con.fetchrow(
                """
                SELECT device_id, name, site_id, model, tags, lifecycle FROM devices
                WHERE tenant_id = $1 AND device_id = $2
                """,
                raw.tenant,
                device_ids[calls % len(device_ids)],
            )

    rows["floor"].offset = await _timed(read_one, samples)

    plans: dict[str, str] = {}
    if os.environ.get("BENCH_TWIN_EXPLAIN"):
        for name, f, after in (
            ("selective first page", selective, ""),
            ("broad first page", broad, ""),
            (f"broad page {DEEP:,}", broad, cursor),
        ):
            c = store.compile_members_filter(f, first_param=4)
            plans[f"PreviewFilter {name}"] = await raw.explain(
                store.members_sql(c), raw.tenant, after, PAGE + 1, *c.params
            )
    return plans


async def main() -> None:
    samples = int(os.environ.get("BENCH_TWIN_SAMPLES", str(SAMPLES)))
    # Columns: grpc = the dynamic group (ListGroupMembers), raw = PreviewFilter,
    # offset = the filter's SQL through raw asyncpg (what PreviewFilter runs).
    rows = {
        "sel1": Row("selective (~0.1%), first page of 100"),
        "broad1": Row("broad (~30%), first page of 100"),
        "deep": Row(f"broad, page {DEEP:,} (after {PAGE * (DEEP - 1):,})"),
        "behind1": Row("desired not applied (~10%), first page"),
        "selcount": Row("selective, total count"),
        "broadcount": Row("broad, total count"),
        "floor": Row("floor: primary-key read of one device"),
    }
    totals: dict[str, int] = {}
    plans: dict[str, str] = {}
    try:
        async with scratch_database() as dsn:
            tenant = uuid.uuid4()
            t0 = time.perf_counter()
            stats, device_ids = await build(dsn, tenant)
            print(f"built {DEVICES:,} devices in {time.perf_counter() - t0:.0f} s")
            print(
                f"reported documents: {stats.mean_chars:,.0f} characters of compact JSON"
                f" on average; {stats.desired:,} devices have a desired document"
            )
            print(await _storage(dsn), flush=True)

            db = Database(await create_pool(dsn, size=2))
            try:
                raw = Raw(db, tenant)
                cursor = await _deep_cursor(raw)
                plans = await _measure_raw(raw, rows, samples, cursor, device_ids)
            finally:
                await db.close()
            _progress("raw SQL measured")

            secret = secrets.token_hex(32)
            port = free_port()
            env = {"DATABASE_URL": dsn, "PULSE_SECRET": secret, "PULSE_DB_POOL_SIZE": "4"}
            async with subprocess_server("bench.serve", port, env):
                token = mint_token(secret.encode(), tenant_id=tenant, role=Role.OPERATOR)
                client = await AsyncPulseClient.connect(
                    f"127.0.0.1:{port}", token=token, timeout=DEADLINE_S
                )
                try:
                    # PreviewFilter first, while the maintainer has nothing to do.
                    deep = await _preview_deep_token(client, tenant, secret.encode(), cursor)
                    await _measure_preview(client, rows, samples, deep)
                    _progress("PreviewFilter measured")
                    totals = await _measure_groups(client, dsn, tenant, rows, samples)
                finally:
                    await client.close()
    finally:
        # Also after a failure: what was measured until then.
        _report(rows, totals, plans)


def _progress(what: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def _report(rows: dict[str, Row], totals: dict[str, int], plans: dict[str, str]) -> None:
    if totals:
        selected = (f"{name} {n:,} ({n / DEVICES:.2%})" for name, n in totals.items())
        print("selected: " + ", ".join(selected))
    print(f"\nTwin queries, {DEVICES:,} devices in one tenant; median ms of sequential calls")
    print(f"  {'':<44}{'group':>10}{'preview':>10}{'raw SQL':>10}")
    for row in rows.values():
        print(row.line())
    _verdicts(rows)
    for name, plan in plans.items():
        print(f"\n-- EXPLAIN {name}\n{plan}")
    sys.stdout.flush()


def _verdicts(rows: dict[str, Row]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for title, column in (("dynamic group", "grpc"), ("PreviewFilter", "raw")):
        sel, b1, bdeep = (getattr(rows[k], column) for k in ("sel1", "broad1", "deep"))
        print(f"  {title}:")
        if sel is None or b1 is None or bdeep is None:
            print("    not measured")
            continue
        print(
            f"    selective first page {sel:.2f} ms; goal < {GOAL_MS:.0f} ms:"
            f" {verdict(sel < GOAL_MS)}"
        )
        print(f"    broad first page {b1:.2f} ms; goal < {GOAL_MS:.0f} ms: {verdict(b1 < GOAL_MS)}")
        print(
            f"    page {DEEP:,} / page 1 = {bdeep / b1:.2f}x; goal <= 2x:"
            f" {verdict(bdeep <= 2 * b1)}"
        )


if __name__ == "__main__":
    run(main)
