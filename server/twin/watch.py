"""WatchTwin's loop: the current twins, then each change, resumable per device.

Every change of a twin bumps its revision and, once committed, is announced
on the tenant's channel (`store.channel`) as `device_id:revision` items
(server/twin/notify.py). The loop subscribes before its first read, so a
change committed in between is seen either by the read or by a
notification; after that, a notification names the devices to re-read, and
a gap (a full queue or a lost LISTEN connection) re-reads them all, as does
a quiet spell of RESYNC_S seconds (which repairs an announcement lost to a
writer that died right after committing). A twin is sent only when its
revision is above the last one sent for that device, so nothing is
repeated, and since a re-read returns the latest row, a watcher that fell
behind skips straight to the newest twin instead of replaying history.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from pulse.device.v1 import twin_pb2

from server.db import Database
from server.errors import NotFound
from server.listener import GAP, Listener
from server.twin import store

Render = Callable[[store.TwinRecord], twin_pb2.Twin]

# Bounds the memory a watcher that stops reading can hold; beyond it, the
# queue collapses into one gap and the watcher re-reads.
_QUEUE = 256
RESYNC_S = 30.0


def _changed(payloads: Iterable[str], watched: set[str], sent: dict[str, int]) -> set[str] | None:
    """Watched devices with a newer revision than sent; None: re-read all."""
    changed: set[str] = set()
    for payload in payloads:
        if payload == GAP:
            return None
        for item in payload.split(","):
            # Device ids may contain ":" but revisions never do.
            device_id, _, revision = item.rpartition(":")
            if device_id in watched and int(revision) > sent.get(device_id, -1):
                changed.add(device_id)
    return changed


async def watch(
    db: Database,
    listener: Listener,
    tenant_id: uuid.UUID,
    device_ids: Sequence[str],
    resume: dict[str, int],
    render: Render,
) -> AsyncIterator[twin_pb2.Twin]:
    """Twins of `device_ids` as they change; `resume` maps a device to the
    revision the caller already has. NotFound if any device is unknown."""
    sent = dict(resume)
    watched = set(device_ids)

    async def read(ids: Sequence[str]) -> list[store.TwinRecord]:
        async with db.tenant(tenant_id, readonly=True) as con:
            return await store.get_twins(con, tenant_id, ids)

    subscription = await listener.subscribe(store.channel(tenant_id), maxsize=_QUEUE)
    try:
        records = await read(device_ids)
        found = {r.device_id for r in records}
        missing = sorted(watched - found)
        if missing:
            raise NotFound("device", missing[0])
        while True:
            for record in records:
                if record.revision > sent.get(record.device_id, -1):
                    sent[record.device_id] = record.revision
                    yield render(record)
            changed: set[str] | None = set()
            while changed is not None and not changed:
                try:
                    first = await asyncio.wait_for(subscription.get(), RESYNC_S)
                except TimeoutError:
                    first = GAP
                changed = _changed([first, *subscription.drain()], watched, sent)
            records = await read(device_ids if changed is None else sorted(changed))
    finally:
        subscription.close()
