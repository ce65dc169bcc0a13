"""What metrics and the per-call log event cost: GetDevice through the real
server with its observing interceptor, and with a pass-through in its place.

Both servers run at once, each in its own process, and their rounds
alternate so that drift in the machine's speed falls on both alike. The
log level is the servers' default for this bench (WARNING): the per-call
INFO line predates metrics, and what a log line costs depends on where
stderr goes.

    .venv/bin/python -m bench.observability
"""

from __future__ import annotations

import secrets
import statistics

from pulse_client import AsyncPulseClient

from bench.harness import (
    closed_loop,
    free_port,
    run,
    scratch_database,
    seed_tenant,
    subprocess_server,
)
from server.auth import Role, mint_token

DEVICES = 1000
ROUNDS = 9


def _device_id(i: int) -> str:
    return f"BENCH-{i % DEVICES + 1:06d}"


async def main() -> None:
    async with scratch_database() as dsn:
        tenant = await seed_tenant(dsn, [_device_id(i) for i in range(DEVICES)])
        secret = secrets.token_hex(32)
        env = {"DATABASE_URL": dsn, "PULSE_SECRET": secret, "PULSE_DB_POOL_SIZE": "10"}
        observed_port, bare_port = free_port(), free_port()
        token = mint_token(secret.encode(), tenant_id=tenant, role=Role.VIEWER)
        print(f"GetDevice, 64 in flight, medians of {ROUNDS} alternating rounds")
        async with (
            subprocess_server("bench.serve", observed_port, env),
            subprocess_server("bench.serve", bare_port, {**env, "BENCH_UNOBSERVED": "1"}),
        ):
            observed = await AsyncPulseClient.connect(f"127.0.0.1:{observed_port}", token=token)
            bare = await AsyncPulseClient.connect(f"127.0.0.1:{bare_port}", token=token)
            rates: dict[str, list[float]] = {"observed": [], "bare": []}
            for _ in range(ROUNDS):
                for name, client in (("bare", bare), ("observed", observed)):

                    async def get(i: int, client: AsyncPulseClient = client) -> object:
                        return await client.devices.get(_device_id(i))

                    result = await closed_loop(name, get, rounds=1, warmup=0.5, seconds=3.0)
                    rates[name].append(result.rate)
            await observed.close()
            await bare.close()
        bare_rate = statistics.median(rates["bare"])
        observed_rate = statistics.median(rates["observed"])
        print(f"  without observing interceptor     {bare_rate:9,.0f}/s")
        print(f"  with metrics and log event        {observed_rate:9,.0f}/s")
        cost = 1 - observed_rate / bare_rate
        verdict = "met" if cost < 0.05 else "NOT met"
        print(f"  observing costs {cost:+.1%} of the throughput; goal < 5%: {verdict}")


if __name__ == "__main__":
    run(main)
