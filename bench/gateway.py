"""GetTwin through the HTTP gateway beside the same call over gRPC.

In one run, 64 requests in flight each, every server in its own process, and
both driven by C load generators so the figures are the servers', not a
Python client's (the client shares the two cores with the servers):
  - GetTwin over gRPC: h2load, one HTTP/2 connection with 64 streams, as a
    gRPC channel would (the answers are checked once with the typed client);
  - GET /customer/devices/{id}/twin through the gateway, and the same under
    /api/v1 as upstream's current frontend calls it: wrk, 64 HTTP/1.1
    keep-alive connections.
The gateway's cost is the HTTP rate as a share of the gRPC one. The typed
Python client's gRPC rate is printed too, for scale. (httpx as the HTTP
client managed only ~60 requests/s at 64 in flight here, which measures
httpx, so it is not used.)

Needs Debian's `wrk` and `nghttp2-client` (h2load).

    .venv/bin/python -m bench.gateway
"""

from __future__ import annotations

import asyncio
import re
import secrets
import statistics
import struct
import tempfile

from pulse.device.v1 import twin_pb2
from pulse_client import AsyncPulseClient, JsonValue

from bench.harness import (
    Result,
    closed_loop,
    free_port,
    run,
    scratch_database,
    seed_tenant,
    subprocess_server,
)
from server.auth import Role, mint_token

DESIRED: dict[str, JsonValue] = {
    "telemetry": {"interval_s": 30, "channels": ["temp", "pressure", "flow"]},
    "led": {"color": "green", "blink": False},
    "thresholds": {f"sensor_{n}": {"low": n, "high": n * 10} for n in range(12)},
}


async def _output(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    return (await proc.communicate())[0].decode()


async def _h2load(url: str, token: str, request: bytes) -> float:
    """gRPC calls per second, the request framed as a length-prefixed gRPC message."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as body:
        body.write(b"\x00" + struct.pack(">I", len(request)) + request)
        body.flush()
        rates = []
        for _ in range(3):
            out = await _output(
                "h2load",
                "-c1",
                "-m64",
                "-D6",
                "-d",
                body.name,
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-H",
                f"authorization: Bearer {token}",
                url,
            )
            found = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
            if found is None:
                raise RuntimeError(f"h2load said:\n{out}")
            rates.append(float(found.group(1)))
    return statistics.median(rates)


def _ms(out: str, label: str) -> float:
    found = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", out)
    if not found:
        return float("nan")
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def _wrk(label: str, url: str, token: str) -> Result:
    rates, p50s, p99s = [], [], []
    for _ in range(3):
        out = await _output(
            "wrk", "-t2", "-c64", "-d6s", "--latency", "-H", f"Authorization: Bearer {token}", url
        )
        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if found is None:
            raise RuntimeError(f"wrk said:\n{out}")
        rates.append(float(found.group(1)))
        p50s.append(_ms(out, "50"))
        p99s.append(_ms(out, "99"))
    return Result(
        label,
        statistics.median(rates),
        statistics.median(p50s),
        statistics.median(p99s),
    )


async def main() -> None:
    async with scratch_database() as dsn:
        tenant = await seed_tenant(dsn, [])
        secret = secrets.token_hex(32)
        token = mint_token(secret.encode(), tenant_id=tenant, role=Role.ADMIN)
        grpc_port, http_port = free_port(), free_port()
        env = {"DATABASE_URL": dsn, "PULSE_SECRET": secret}
        async with (
            subprocess_server("bench.serve", grpc_port, env),
            subprocess_server(
                "launcher",
                http_port,
                {**env, "PULSE_HTTP_PORT": str(http_port), "PULSE_LOG_LEVEL": "WARNING"},
                ["gateway", "--grpc-target", f"127.0.0.1:{grpc_port}", "--workers", "1"],
            ),
        ):
            client = await AsyncPulseClient.connect(f"127.0.0.1:{grpc_port}", token=token)
            await client.devices.create("BENCH-1")
            await client.twin.update_desired("BENCH-1", DESIRED, expected_version=0)
            print("GetTwin, 64 in flight, medians of 3 rounds")

            async def grpc_call(i: int) -> object:
                return await client.twin.get("BENCH-1")

            typed = await closed_loop("GetTwin over gRPC (typed client)", grpc_call)
            await client.close()
            request = twin_pb2.GetTwinRequest(device_id="BENCH-1").SerializeToString()
            grpc_rate = await _h2load(
                f"http://127.0.0.1:{grpc_port}/pulse.device.v1.TwinService/GetTwin", token, request
            )
            base = f"http://127.0.0.1:{http_port}"
            http = await _wrk(
                "GET /customer/.../twin (wrk)", f"{base}/customer/devices/BENCH-1/twin", token
            )
            upstream = await _wrk(
                "GET /api/v1/customer/.../twin (wrk)",
                f"{base}/api/v1/customer/devices/BENCH-1/twin",
                token,
            )
            print(f"  {'GetTwin over gRPC (h2load)':<34} {grpc_rate:9,.0f}/s")
            print(http.row(grpc_rate))
            print(upstream.row(grpc_rate))
            print(typed.row(grpc_rate))
            for label, result in (("/customer", http), ("/api/v1/customer", upstream)):
                verdict = "met" if result.rate >= 0.6 * grpc_rate else "NOT met"
                print(
                    f"  {label}: the gateway reaches {result.rate / grpc_rate:.0%} of gRPC; "
                    f"goal >= 60%: {verdict}"
                )


if __name__ == "__main__":
    run(main)
