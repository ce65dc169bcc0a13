"""A tenant-scoped primary-key read at the database alone, 64 tasks on a pool
of 10, in one run:
  - raw asyncpg (no scope: the database's ceiling),
  - `Database.tenant(readonly=True)`: the session scope, two round trips,
  - the same read in a transaction scope (what reads were until issue 15):
    BEGIN + scope, the statement, COMMIT.

    .venv/bin/python -m bench.scope
"""

from __future__ import annotations

from bench.harness import closed_loop, run, scratch_database, seed_tenant
from server.db import Database, create_pool

DEVICES = 1000
SQL = "SELECT device_id, name, tags FROM devices WHERE tenant_id = $1 AND device_id = $2"


def _device_id(i: int) -> str:
    return f"SCOPE-{i % DEVICES:04d}"


async def main() -> None:
    async with scratch_database() as dsn:
        tenant = await seed_tenant(dsn, [_device_id(i) for i in range(DEVICES)])
        db = Database(await create_pool(dsn, size=10), name="bench")
        print("a scoped primary-key read, 64 in flight, pool of 10, medians of 3 rounds")

        async def raw(i: int) -> object:
            return await db.pool.fetchrow(SQL, tenant, _device_id(i))

        async def read_scope(i: int) -> object:
            async with db.tenant(tenant, readonly=True) as con:
                return await con.fetchrow(SQL, tenant, _device_id(i))

        async def transaction_scope(i: int) -> object:
            async with db.tenant(tenant) as con:
                return await con.fetchrow(SQL, tenant, _device_id(i))

        ceiling = await closed_loop("raw asyncpg, no scope", raw)
        print(ceiling.row())
        two = await closed_loop("read scope (2 round trips)", read_scope)
        three = await closed_loop("transaction scope (3 round trips)", transaction_scope)
        print(two.row(ceiling.rate))
        print(three.row(ceiling.rate))
        print(f"  the read scope reads {two.rate / three.rate:.2f}x as often")
        await db.close()


if __name__ == "__main__":
    run(main)
