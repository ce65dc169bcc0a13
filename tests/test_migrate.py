"""The migration runner: once each, checksums, transactions, one migrator at a time."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from server import migrate
from tests.conftest import with_database


@pytest.fixture
async def scratch(server_url: str) -> AsyncIterator[str]:
    name = f"pulse_mig_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def _write(folder: Path, name: str, sql: str) -> None:
    (folder / name).write_text(sql)


async def _count(dsn: str, sql: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return int(await con.fetchval(sql))
    finally:
        await con.close()


async def test_applies_once_in_order(scratch: str, tmp_path: Path) -> None:
    _write(tmp_path, "0001_a.sql", "CREATE TABLE a (n int); INSERT INTO a VALUES (1);")
    _write(tmp_path, "0002_b.sql", "INSERT INTO a VALUES (2);")
    assert await migrate.apply(scratch, tmp_path) == ["0001_a.sql", "0002_b.sql"]
    assert await migrate.apply(scratch, tmp_path) == []
    assert await _count(scratch, "SELECT sum(n) FROM a") == 3


async def test_changed_applied_file_is_refused(scratch: str, tmp_path: Path) -> None:
    _write(tmp_path, "0001_a.sql", "CREATE TABLE a (n int);")
    await migrate.apply(scratch, tmp_path)
    _write(tmp_path, "0001_a.sql", "CREATE TABLE a (n bigint);")
    _write(tmp_path, "0002_b.sql", "CREATE TABLE b (n int);")
    with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
        await migrate.apply(scratch, tmp_path)
    assert await _count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename = 'b'") == 0


async def test_failed_file_leaves_nothing(scratch: str, tmp_path: Path) -> None:
    _write(tmp_path, "0001_a.sql", "CREATE TABLE a (n int); SELECT 1/0;")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate.apply(scratch, tmp_path)
    assert await _count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename = 'a'") == 0
    assert await _count(scratch, "SELECT count(*) FROM schema_migrations") == 0


async def test_concurrent_starters_migrate_once(scratch: str, tmp_path: Path) -> None:
    # Not idempotent on purpose: a second run of the file would fail.
    _write(tmp_path, "0001_a.sql", "CREATE TABLE a (n int); SELECT pg_sleep(0.3);")
    results = await asyncio.gather(*(migrate.apply(scratch, tmp_path) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, 1]


def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "1_a.sql", "")
    with pytest.raises(migrate.MigrationError, match=r"NNNN_words\.sql"):
        migrate.discover(tmp_path)


async def test_project_migrations_apply_twice_cleanly(scratch: str) -> None:
    assert await migrate.apply(scratch)
    assert await migrate.apply(scratch) == []
