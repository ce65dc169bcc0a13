"""The real server for benchmarks, in its own process (PORT, DATABASE_URL)."""

from __future__ import annotations

import os

from bench.harness import run
from server import config
from server.app import start, wait_for_signal


async def main() -> None:
    settings = config.load({**os.environ, "PULSE_GRPC_PORT": os.environ["PORT"]})
    running = await start(settings, os.environ["DATABASE_URL"])
    await wait_for_signal()
    await running.stop()


if __name__ == "__main__":
    run(main)
