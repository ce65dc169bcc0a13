"""GetDevice or UpdateDesired served by two checkouts, in alternating rounds:
the server's throughput and its CPU time per call, which this noisy machine
measures more steadily than throughput alone.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.compare /tmp/before [get|update] [rounds]

Each round starts `bench.serve` from one checkout's directory on one scratch
database, drives it with the typed client at 64 in flight for 4 s after 1 s
of warm-up, and stops it. Both checkouts run on this venv's packages.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
from pulse_client import AsyncPulseClient

from bench import registry, twin
from bench.harness import (
    ROOT,
    free_port,
    listening,
    run,
    scratch_database,
    seed_tenant,
    timed_round,
)
from server.auth import Role, mint_token

Call = Callable[[AsyncPulseClient], Callable[[int], Awaitable[object]]]


def _get(client: AsyncPulseClient) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> object:
        return await client.devices.get(registry._device_id(i))

    return call


_versions: dict[str, int] = {}


def _update(client: AsyncPulseClient) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> object:
        device = twin._device(i)
        found = await client.twin.update_desired(
            device, twin._document(i), expected_version=_versions[device]
        )
        _versions[device] = found.desired_version
        return found

    return call


async def _seed(dsn: str, method: str) -> uuid.UUID:
    if method == "get":
        ids = [registry._device_id(i) for i in range(registry.DEVICES)]
        return await seed_tenant(dsn, ids, tags={"env": "prod", "line": "3"})
    _versions.update({twin._device(i): 0 for i in range(twin.DEVICES)})
    return await seed_tenant(dsn, list(_versions))


async def _served_round(tree: Path, dsn: str, tenant: uuid.UUID, make: Call) -> tuple[float, float]:
    """(calls/s, server CPU µs per call) of one round served from `tree`."""
    secret, port = secrets.token_hex(32), free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PULSE_SECRET": secret,
        "PULSE_DB_POOL_SIZE": "10",
        "PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.serve", cwd=tree, env=env
    )
    try:
        if not await listening(port, proc, timeout_s=30):
            raise RuntimeError(f"bench.serve from {tree} did not start")
        server = psutil.Process(proc.pid)
        token = mint_token(secret.encode(), tenant_id=tenant, role=Role.OPERATOR)
        client = await AsyncPulseClient.connect(f"127.0.0.1:{port}", token=token)
        call = make(client)
        await timed_round(call, 64, 1.0)
        before, start = server.cpu_times(), time.perf_counter()
        rate, _ = await timed_round(call, 64, 4.0)
        elapsed, after = time.perf_counter() - start, server.cpu_times()
        await client.close()
    finally:
        proc.terminate()
        await proc.wait()
    cpu = after.user + after.system - before.user - before.system
    return rate, cpu / (rate * elapsed) * 1e6


async def compare(before: Path, method: str, rounds: int) -> None:
    make = {"get": _get, "update": _update}[method]
    trees = {"before": before, "this tree": ROOT}
    async with scratch_database() as dsn:
        tenant = await _seed(dsn, method)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for n in range(rounds):
            order = list(trees) if n % 2 == 0 else list(reversed(trees))
            for name in order:
                results[name].append(await _served_round(trees[name], dsn, tenant, make))
    print(f"{method}, 64 in flight, medians of {rounds} alternating rounds; before: {before}")
    rates = {}
    for name, found in results.items():
        rates[name] = statistics.median(rate for rate, _ in found)
        cpu = statistics.median(cpu for _, cpu in found)
        print(f"  {name:<10} {rates[name]:7,.0f}/s  server CPU {cpu:5.0f} µs per call")
    print(f"  this tree / before: {rates['this tree'] / rates['before']:.2f}x")


if __name__ == "__main__":
    tree = Path(sys.argv[1]).resolve()
    method = sys.argv[2] if len(sys.argv) > 2 else "get"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    run(lambda: compare(tree, method, rounds))
