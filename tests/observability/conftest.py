"""Scraping /metrics as Prometheus would, and the fixtures the metric tests
borrow: the gateway (whose /metrics is this process's, as in `pulse run`)
and the twin tests' evaluator and MQTT client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import free_port, listening
from tests.faults.conftest import pulse_env
from tests.gateway.conftest import gateway_url, http  # noqa: F401
from tests.twin.conftest import mqtt, retained_cleanup, start_evaluator  # noqa: F401

PULSE = str(Path(sys.executable).parent / "pulse")


@dataclass(frozen=True)
class PulseProcess:
    process: asyncio.subprocess.Process
    #: A client of its ops port (/metrics, /healthz, /readyz).
    http: httpx.AsyncClient
    grpc_port: int
    #: Where its stdout and stderr go.
    log_file: Path


@contextlib.asynccontextmanager
async def pulse_process(
    command: str, dsn: str, data_dir: Path, *args: str, **overrides: str
) -> AsyncIterator[PulseProcess]:
    """`pulse <command> <args>` on `dsn`, its ops port answering. Unless the
    test ended it, stopped with SIGTERM at the end, which must end it
    cleanly; whatever it started is killed in any case."""
    ops_port, grpc_port = free_port(), free_port()
    log_file = data_dir / "serve.log"
    env = pulse_env(
        {
            "DATABASE_URL": dsn,
            "PULSE_DATA_DIR": str(data_dir),
            "PULSE_OPS_PORT": str(ops_port),
            # The gateway answers /metrics on its own port.
            "PULSE_HTTP_PORT": str(ops_port),
            "PULSE_GRPC_PORT": str(grpc_port),
            **overrides,
        }
    )
    with log_file.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            PULSE, command, *args, env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        assert await listening(ops_port, process, timeout_s=30), log_file.read_text()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops_port}", timeout=10) as http:
            yield PulseProcess(process, http, grpc_port, log_file)
        if process.returncode is None:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 30) == 0, log_file.read_text()
    finally:
        # Its own session: workers a failed test leaves behind go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


#: The series a family of each type exposes, by suffix.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


@dataclass(frozen=True)
class Scrape:
    #: (sample name, labels, value) of every series.
    samples: list[tuple[str, dict[str, str], float]]
    #: Every series name the families declare, with or without samples yet.
    names: frozenset[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the series `name` whose labels include `labels`."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: list[tuple[str, dict[str, str], float]] = []
    names: set[str] = set()
    for family in text_string_to_metric_families(response.text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        samples.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return Scrape(samples, frozenset(names))
