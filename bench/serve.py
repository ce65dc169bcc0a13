"""The real server for benchmarks, in its own process (PORT, DATABASE_URL).

With BENCH_UNOBSERVED=1 the call chain has a pass-through where its observing
interceptor (metrics, the log event) would be: bench.observability's baseline.
"""

from __future__ import annotations

import os

from bench.harness import run
from server import config, interceptors
from server.app import start, wait_for_signal

if os.environ.get("BENCH_UNOBSERVED"):
    interceptors.ObservingInterceptor = interceptors.AroundInterceptor  # type: ignore[misc,assignment]


async def main() -> None:
    settings = config.load({**os.environ, "PULSE_GRPC_PORT": os.environ["PORT"]})
    running = await start(settings, os.environ["DATABASE_URL"])
    await wait_for_signal()
    await running.stop()


if __name__ == "__main__":
    run(main)
