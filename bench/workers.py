"""`pulse serve --workers N`: GetDevice under a C load generator (h2load,
Debian's nghttp2-client) with one worker and with two, in one run.

h2load speaks plain HTTP/2, so the gRPC request is framed here and every
success is checked against the servers' own count: after each run the OK
calls in /metrics must equal h2load's 2xx answers (a gRPC error also
answers HTTP 200, with its status in the trailers).

    .venv/bin/python -m bench.workers
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import statistics
import struct
import tempfile

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pulse.device.v1 import devices_pb2

from bench.harness import free_port, run, scratch_database, seed_tenant, subprocess_server
from server.auth import Role, mint_token

DEVICES = 1000
SECONDS = 5
ROUNDS = 3
CONNECTIONS, STREAMS = 16, 8
PATH = "/pulse.device.v1.DeviceRegistryService/GetDevice"


def _request_file() -> str:
    """A file holding one framed gRPC request (uncompressed, 4-byte length)."""
    message = devices_pb2.GetDeviceRequest(device_id="BENCH-000001").SerializeToString()
    with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as f:
        f.write(b"\x00" + struct.pack(">I", len(message)) + message)
    return f.name


async def _h2load(port: int, body_file: str, token: str) -> tuple[float, int]:
    """(requests per second, 2xx answers) of one timed run."""
    process = await asyncio.create_subprocess_exec(
        "h2load",
        f"--duration={SECONDS}",
        "--warm-up-time=1",
        f"--clients={CONNECTIONS}",
        f"--max-concurrent-streams={STREAMS}",
        f"--data={body_file}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--header=authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{PATH}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await process.communicate())[0].decode()
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if process.returncode != 0 or rate is None or ok is None:
        raise RuntimeError(f"h2load failed:\n{out}")
    return float(rate.group(1)), int(ok.group(1))


async def _ok_calls(ops_port: int) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{ops_port}/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels.get("grpc_method") == "GetDevice"
        and sample.labels.get("grpc_code") == "OK"
    )


async def main() -> None:
    if shutil.which("h2load") is None:
        raise SystemExit("bench.workers needs h2load (apt install nghttp2-client)")
    async with scratch_database() as dsn:
        tenant = await seed_tenant(dsn, [f"BENCH-{i + 1:06d}" for i in range(DEVICES)])
        secret = secrets.token_hex(32)
        token = mint_token(secret.encode(), tenant_id=tenant, role=Role.VIEWER)
        body_file = _request_file()
        print(
            f"GetDevice via h2load, {CONNECTIONS} connections x {STREAMS} streams, "
            f"{SECONDS} s runs, medians of {ROUNDS}"
        )
        rates: dict[int, list[float]] = {}
        for workers in (1, 2):
            port, ops_port = free_port(), free_port()
            env = {
                "DATABASE_URL": dsn,
                "PULSE_SECRET": secret,
                "PULSE_GRPC_PORT": str(port),
                "PULSE_OPS_PORT": str(ops_port),
                "PULSE_LOG_LEVEL": "WARNING",
                "PULSE_DB_POOL_SIZE": "10",
            }
            args = ["serve", "--workers", str(workers)]
            async with subprocess_server("launcher", ops_port, env, args):
                await asyncio.sleep(2)  # every worker up, not only the first
                for _ in range(ROUNDS):
                    before = await _ok_calls(ops_port)
                    rate, answered = await _h2load(port, body_file, token)
                    counted = await _ok_calls(ops_port) - before
                    # Warm-up requests are answered but not in h2load's count.
                    if counted < answered:
                        raise RuntimeError(f"{answered} answers but {counted:.0f} OK calls")
                    rates.setdefault(workers, []).append(rate)
            median = statistics.median(rates[workers])
            print(f"  {workers} worker{'s' if workers > 1 else ' '}  {median:9,.0f}/s")
        one, two = (statistics.median(rates[n]) for n in (1, 2))
        print(f"  two workers serve {two / one:.2f}x one worker's calls")


if __name__ == "__main__":
    run(main)
