"""Watch streams under load: commit-to-delivery latency, CPU and memory.

One tenant with 10,000 devices; 1,000 watchers each narrowed to its own 10
devices, plus 10 watchers of the whole tenant, all on one server (its own
process), read through the typed client in this process. 10,000 events
arrive over 10 s: 100 transactions a second, 10 events each, through the
evaluator's own statement; every event reaches 11 watchers (110,000
deliveries). Measured in the same run:
  - the framework's floor: a bare grpc.aio server (its own process, no
    database, no auth) fanning the same pattern of events out to the same
    streams, from when it emits an event to when a watcher has it;
  - the database's floor: commit to a raw LISTEN in this process;
  - pulse: commit (from just before COMMIT is sent, so the commit itself is
    included) to delivery through the server and the typed client;
and each server's CPU per delivery and resident memory (idle, peak).

    .venv/bin/python -m bench.watch [--watchers 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from pulse.device.v1 import connectivity_pb2
from pulse_client import AsyncPulseClient

from bench.harness import ROOT, free_port, run, scratch_database, seed_tenant
from server.auth import Role, mint_token
from server.connectivity.model import CHANNEL, Signal
from server.connectivity.transitions import DeviceSignal, apply_signals, fleet
from server.db import Database, create_pool

PER_WATCHER = 10
BROAD_WATCHERS = 10
CHANNELS = 10
Response = connectivity_pb2.WatchConnectionEventsResponse


def _memory_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} for {pid}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _devices(watchers: int) -> list[str]:
    return [f"W-{n:05d}" for n in range(watchers * PER_WATCHER)]


def _transactions(devices: list[str], seconds: float) -> list[list[str]]:
    """100 batches a second; watcher w's devices are devices[w::watchers], so
    every batch touches 10 different narrowed watchers."""
    count = int(seconds * 100)
    per = len(devices) // count
    return [devices[k * per : (k + 1) * per] for k in range(count)]


@contextlib.asynccontextmanager
async def subprocess_server(args: list[str], env: dict[str, str]) -> AsyncIterator[int]:
    """`python -m ...args` with env; yields its pid once it accepts connections."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=ROOT, env={**os.environ, **env}
    )
    try:
        yield proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


@dataclass
class Watchers:
    """Every watch stream of a run, recording (event id, arrival time)."""

    total: int
    received: list[tuple[int, float, float]] = field(default_factory=list)
    expected: int = sys.maxsize
    ready: int = 0
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    all_received: asyncio.Event = field(default_factory=asyncio.Event)

    async def watch(self, client: AsyncPulseClient, device_ids: list[str]) -> None:
        async with client.connectivity.watch(device_ids=device_ids) as stream:
            async for message in stream:
                if message.HasField("event"):
                    event = message.event
                    sent = event.timestamp.seconds + event.timestamp.nanos / 1e9
                    self.received.append((event.id, time.time(), sent))
                    if len(self.received) >= self.expected:
                        self.all_received.set()
                else:
                    self.ready += 1
                    if self.ready == self.total:
                        self.all_ready.set()

    def expect(self, count: int) -> None:
        self.expected = count
        if len(self.received) >= count:
            self.all_received.set()


@contextlib.asynccontextmanager
async def watching(
    address: str, token: str, devices: list[str], watchers: int
) -> AsyncIterator[Watchers]:
    """All streams open and past their first bookmark; closed afterwards."""
    clients = [
        await AsyncPulseClient.connect(address, token=token, timeout=60) for _ in range(CHANNELS)
    ]
    state = Watchers(total=watchers + BROAD_WATCHERS)
    tasks = [
        asyncio.create_task(state.watch(clients[w % CHANNELS], devices[w::watchers]))
        for w in range(watchers)
    ]
    tasks += [
        asyncio.create_task(state.watch(clients[w % CHANNELS], [])) for w in range(BROAD_WATCHERS)
    ]
    try:
        await asyncio.wait_for(state.all_ready.wait(), 120)
        yield state
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()


async def _paced(
    batches: list[list[str]], seconds: float, emit: Callable[[list[str]], Any]
) -> None:
    start = time.perf_counter()
    for k, batch in enumerate(batches):
        delay = start + k * seconds / len(batches) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await emit(batch)


# -- the framework's floor: a bare grpc.aio server, run as `--bare-server PORT`


async def bare_server(port: int, watchers: int, seconds: float) -> None:
    """Streams the same pattern of events to the same streams, from memory.
    Each event's timestamp is when the server emitted it."""
    streams: list[tuple[frozenset[str], asyncio.Queue[Response]]] = []
    all_in = asyncio.Event()
    total = watchers + BROAD_WATCHERS

    async def watch(
        request: connectivity_pb2.WatchConnectionEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Response]:
        queue: asyncio.Queue[Response] = asyncio.Queue()
        streams.append((frozenset(request.device_ids), queue))
        if len(streams) == total:
            all_in.set()
        yield Response(cursor="start")
        while True:
            yield await queue.get()

    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(
        watch,
        request_deserializer=connectivity_pb2.WatchConnectionEventsRequest.FromString,
        response_serializer=Response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "pulse.device.v1.ConnectivityService", {"WatchConnectionEvents": handler}
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await all_in.wait()
    await asyncio.sleep(1)
    by_device: dict[str, list[asyncio.Queue[Response]]] = {}
    broad = [q for devices, q in streams if not devices]
    for devices, queue in streams:
        for device_id in devices:
            by_device.setdefault(device_id, []).append(queue)
    next_id = 0

    async def emit(batch: list[str]) -> None:
        nonlocal next_id
        for device_id in batch:
            next_id += 1
            event = connectivity_pb2.ConnectionEvent(
                id=next_id, device_id=device_id, event_type=connectivity_pb2.CONNECTED
            )
            event.timestamp.FromNanoseconds(time.time_ns())
            message = Response(event=event, cursor=f"c{next_id}")
            for queue in [*by_device.get(device_id, ()), *broad]:
                queue.put_nowait(message)

    await _paced(_transactions(_devices(watchers), seconds), seconds, emit)
    await server.wait_for_termination()


@dataclass(frozen=True)
class Outcome:
    name: str
    latencies_ms: list[float]
    expected: int
    cpu_s: float
    idle_kib: int
    peak_kib: int

    def row(self, floor_p50: float | None = None) -> str:
        p50 = statistics.median(self.latencies_ms)
        p99 = _percentile(self.latencies_ms, 0.99)
        ratio = f"{p50 / floor_p50:7.1f}x" if floor_p50 else " " * 8
        per = self.cpu_s / max(1, len(self.latencies_ms)) * 1e6
        return (
            f"  {self.name:<34} {p50:8.2f} {p99:8.2f}  {ratio}  {per:5.0f} us"
            f"  {self.idle_kib / 1024:4.0f}/{self.peak_kib / 1024:4.0f} MB"
            f"  {len(self.latencies_ms):,}/{self.expected:,}"
        )


async def _bare_run(watchers: int, seconds: float) -> Outcome:
    port = free_port()
    devices = _devices(watchers)
    args = ["bench.watch", "--bare-server", str(port), "--watchers", str(watchers)]
    args += ["--seconds", str(seconds)]
    async with (
        subprocess_server(args, {}) as pid,
        watching(f"127.0.0.1:{port}", "unused", devices, watchers) as state,
    ):
        idle = _memory_kib(pid, "VmRSS")
        cpu = _cpu_s(pid)
        emitted = sum(len(batch) for batch in _transactions(devices, seconds))
        state.expect(emitted * (1 + BROAD_WATCHERS))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.all_received.wait(), seconds + 60)
        cpu = _cpu_s(pid) - cpu
        peak = _memory_kib(pid, "VmHWM")
    latencies = [(at - sent) * 1000 for _, at, sent in state.received]
    return Outcome("bare grpc.aio fan-out (framework)", latencies, state.expected, cpu, idle, peak)


async def _pulse_run(watchers: int, seconds: float) -> tuple[Outcome, list[float]]:
    devices = _devices(watchers)
    async with scratch_database() as dsn:
        tenant = await seed_tenant(dsn, devices)
        db = Database(await create_pool(dsn, size=2))
        secret = secrets.token_hex(32)
        token = mint_token(secret.encode(), tenant_id=tenant, role=Role.VIEWER)
        port = free_port()
        env = {
            "DATABASE_URL": dsn,
            "PULSE_SECRET": secret,
            "PULSE_DB_POOL_SIZE": "10",
            "PULSE_LOG_LEVEL": "WARNING",
            "PORT": str(port),
            # Every watcher uses one token: the admission limits (100 streams
            # per caller) would refuse most of them.
            "PULSE_GRPC_MAX_STREAMS_PER_CALLER": str(watchers + 10),
            "PULSE_GRPC_MAX_STREAMS_PER_TENANT": str(watchers + 10),
        }
        async with (
            subprocess_server(["bench.serve"], env) as pid,
            watching(f"127.0.0.1:{port}", token, devices, watchers) as state,
        ):
            idle = _memory_kib(pid, "VmRSS")
            notified: list[float] = []
            listen = await asyncpg.connect(dsn)
            await listen.add_listener(CHANNEL, lambda *_: notified.append(time.time()))
            committed: dict[int, float] = {}
            commit_times: list[float] = []

            async def emit(batch: list[str]) -> None:
                now = datetime.now(UTC)
                async with fleet(db) as con:
                    done = await apply_signals(
                        con, [DeviceSignal(tenant, d, Signal.ONLINE, now) for d in batch]
                    )
                    at = time.time()  # just before COMMIT is sent
                commit_times.append(at)
                for t in done:
                    committed[t.event_id] = at

            cpu = _cpu_s(pid)
            await _paced(_transactions(devices, seconds), seconds, emit)
            state.expect(len(committed) * (1 + BROAD_WATCHERS))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.all_received.wait(), 60)
            cpu = _cpu_s(pid) - cpu
            peak = _memory_kib(pid, "VmHWM")
            await listen.close()
        await db.close()
    latencies = [(at - committed[i]) * 1000 for i, at, _ in state.received if i in committed]
    floor = [(n - c) * 1000 for n, c in zip(notified, commit_times, strict=False)]
    name = "pulse: commit -> watcher"
    return Outcome(name, latencies, state.expected, cpu, idle, peak), floor


async def main(watchers: int, seconds: float) -> None:
    bare = await _bare_run(watchers, seconds)
    pulse, floor = await _pulse_run(watchers, seconds)
    print(
        f"watch: {watchers:,} watchers x {PER_WATCHER} devices + {BROAD_WATCHERS} whole-tenant; "
        f"{sum(map(len, _transactions(_devices(watchers), seconds))):,} events in "
        f"{int(seconds * 100)} transactions over "
        f"{seconds:.0f}s; 11 deliveries each"
    )
    print(
        f"  {'':<34} {'p50 ms':>8} {'p99 ms':>8}  {'p50/bare':>8}  {'CPU/del':>8}"
        f"  {'idle/peak RSS':>13}  delivered"
    )
    print(
        f"  {'commit -> raw LISTEN (database)':<34} {statistics.median(floor):8.2f} "
        f"{_percentile(floor, 0.99):8.2f}"
    )
    print(bare.row())
    base = statistics.median(bare.latencies_ms)
    print(pulse.row(base))
    p99 = _percentile(pulse.latencies_ms, 0.99)
    p99_ok = "met" if p99 < 250 else "NOT met"
    mem_ok = "met" if pulse.peak_kib < 300 * 1024 else "NOT met"
    print(f"  goals: p99 < 250 ms: {p99_ok} ({p99:.0f} ms); peak memory < 300 MB: {mem_ok}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        run(lambda: bare_server(args.bare_server, args.watchers, args.seconds))
    else:
        run(lambda: main(args.watchers, args.seconds))
