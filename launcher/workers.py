"""Several processes on one port (`pulse serve --workers N`, `pulse gateway
--workers N`): a supervisor and N copies of the command.

The supervisor binds the ports first, with SO_REUSEPORT and without
listening, so that a port 0 becomes one free port for every copy and no
other program takes it between two restarts; each copy then listens on it
with SO_REUSEPORT, and the kernel spreads new connections over them. A copy
that exits while the supervisor runs (a crash, an OOM kill, an operator's
SIGTERM to roll it) is started again, after a pause that grows while copies
keep dying young. SIGINT or SIGTERM to the supervisor stops every copy
gracefully and then the supervisor; a copy whose supervisor died without
stopping it (SIGKILL, the OOM killer) stops by itself within a second,
rather than serving on unsupervised.

Metrics: the copies share a PROMETHEUS_MULTIPROC_DIR (a new temporary
directory unless one is set), so whichever copy answers a scrape reports the
sum of all of them, and counters of a copy that died still count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from prometheus_client import multiprocess

log = logging.getLogger("pulse.workers")

#: A copy that ran at least this long died of something other than its start.
_HEALTHY_S = 30.0
_PAUSE_MIN_S, _PAUSE_MAX_S = 1.0, 30.0


async def supervisor_gone() -> None:
    """Return once the process that started this one has exited: the
    kernel then hands this one to another parent."""
    supervisor = os.getppid()
    # Polled: nothing tells a process that its parent died (short of Linux's
    # prctl PDEATHSIG, a signal arriving while a worker may be mid-start).
    while os.getppid() == supervisor:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    log.warning("the supervisor (pid %d) is gone; stopping", supervisor)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to `port` (0: a free one) with SO_REUSEPORT, not
    listening: it keeps the port for the copies and takes no connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise SystemExit(f"pulse: cannot bind {host}:{port}: {error.strerror}") from None
    return sock


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """PROMETHEUS_MULTIPROC_DIR for the copies: the configured one, emptied
    of an earlier run's files, or a temporary one removed at the end."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        os.makedirs(configured, exist_ok=True)
        for name in os.listdir(configured):
            if name.endswith(".db"):
                os.unlink(os.path.join(configured, name))
        yield configured
        return
    folder = tempfile.mkdtemp(prefix="pulse-metrics-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Supervisor:
    """Runs `count` copies of `pulse argv...` with `env`, which names their
    PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], count: int) -> None:
        self._argv = [sys.executable, "-m", "launcher", *argv]
        self._env = env
        self._count = count

    def _gone(self, pid: int) -> None:
        """Its live gauges (pool connections in use, open streams) stop counting."""
        multiprocess.mark_process_dead(pid, self._env["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]

    async def run(self, grace_s: float) -> None:
        """Until SIGINT or SIGTERM; then every copy gets SIGTERM and
        `grace_s` to exit before it is killed."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        keepers = [asyncio.create_task(self._keep(i, stop, grace_s)) for i in range(self._count)]
        log.info("supervising %d workers", self._count)
        await asyncio.gather(*keepers)

    async def _keep(self, index: int, stop: asyncio.Event, grace_s: float) -> None:
        """Worker `index`, started again whenever it exits, until `stop`."""
        pause = _PAUSE_MIN_S
        while not stop.is_set():
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(*self._argv, env=self._env)
            log.info("worker %d started (pid %d)", index, process.pid)
            exited = asyncio.create_task(process.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                await _terminate(process, grace_s)
                self._gone(process.pid)
                return
            self._gone(process.pid)
            if time.monotonic() - started >= _HEALTHY_S:
                pause = _PAUSE_MIN_S
            log.warning(
                "worker %d (pid %d) exited with %s; starting it again in %.0fs",
                index,
                process.pid,
                process.returncode,
                pause,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, _PAUSE_MAX_S)


async def _terminate(process: asyncio.subprocess.Process, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        log.warning("worker pid %d did not stop within %.0fs; killing it", process.pid, grace_s)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
