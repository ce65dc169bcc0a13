"""Apply the numbered SQL files in migrations/, once each, in order.

Each file runs in its own transaction and is recorded with its SHA-256; a
file changed after it was applied stops the run instead of drifting silently.
A session advisory lock makes concurrent starters wait for one another.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works; it only has to be the same for every process.
_LOCK_KEY = 0x70756C7365  # "pulse"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_words.sql")
        found.append(Migration(match.group(1), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number: {versions}")
    return found


async def pending(con: asyncpg.Connection, folder: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of this build's migrations the database has not applied."""
    if await con.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return [m.name for m in discover(folder)]
    applied = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
    return [m.name for m in discover(folder) if m.version not in applied]


async def apply(dsn: str, folder: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; return the names of those applied."""
    migrations = discover(folder)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply_locked(con, migrations)
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await con.close()


async def _apply_locked(con: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await con.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    text PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    applied = {
        r["version"]: (r["name"], r["checksum"])
        for r in await con.fetch("SELECT version, name, checksum FROM schema_migrations")
    }
    done = []
    for migration in migrations:
        if migration.version in applied:
            name, checksum = applied[migration.version]
            if checksum != migration.checksum:
                raise MigrationError(
                    f"{migration.name} was changed after it was applied as {name}; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        async with con.transaction():
            await con.execute(migration.sql)
            await con.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("applied migration %s", migration.name)
        done.append(migration.name)
    return done
