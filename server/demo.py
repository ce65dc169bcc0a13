"""The demo tenant `make run` seeds, so a newcomer has devices to call."""

from __future__ import annotations

import uuid

from server.db import Database, create_pool
from server.errors import AlreadyExists
from server.registry import store
from server.tenants import ensure_tenant

# Fixed so tokens minted with `pulse token` keep working across restarts.
DEMO_TENANT = uuid.UUID("00000000-0000-4000-8000-00000000de00")


async def seed_demo(dsn: str, *, devices: int = 5) -> None:
    """Create the demo tenant, a site and DEVICE-01.. if they are missing."""
    db = Database(await create_pool(dsn, size=1), name="demo")
    try:
        async with db.admin() as con:
            await ensure_tenant(con, DEMO_TENANT, "Demo")
        async with db.tenant(DEMO_TENANT) as con:
            if not await con.fetchval("SELECT 1 FROM sites WHERE site_id = 'site-01'"):
                await store.create_site(con, DEMO_TENANT, site_id="site-01", name="Plant 1")
        for n in range(1, devices + 1):
            try:
                async with db.tenant(DEMO_TENANT) as con:
                    await store.create_device(
                        con,
                        DEMO_TENANT,
                        device_id=f"DEVICE-{n:02d}",
                        name=f"Demo device {n}",
                        site_id="site-01",
                        model="pulse-sim",
                        tags={"env": "demo", "production": ""} if n % 2 else {"env": "demo"},
                        metadata={"firmware": "1.0.0"},
                    )
            except AlreadyExists:
                pass
    finally:
        await db.close()
