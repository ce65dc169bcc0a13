"""MQTT credentials of the demo devices that `pulse run` simulates.

Issued through the API (so a broker mirror hears of them too) and kept in
`.data/demo-credentials.json`, so the command the banner prints keeps working
across restarts; one that stopped working (revoked in the console, say) is
replaced by a new one.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import pulse_client as pc

from server.broker_access.authenticator import Authenticator, Refused
from server.broker_access.rules import device_client_id

log = logging.getLogger("pulse")

Credential = tuple[str, str]


def _load(path: Path) -> dict[str, Credential]:
    try:
        raw = json.loads(path.read_text())
        return {device: (str(u), str(s)) for device, (u, s) in raw.items()}
    except (OSError, ValueError, TypeError):
        return {}


def _save(path: Path, credentials: dict[str, Credential]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=1)


async def ensure(
    client: pc.AsyncPulseClient,
    authenticator: Authenticator,
    tenant_id: uuid.UUID,
    device_ids: Sequence[str],
    path: Path,
) -> dict[str, Credential]:
    """A working (username, secret) for each device that can have one."""
    stored = _load(path)
    working: dict[str, Credential] = {}
    for device_id in device_ids:
        known = stored.get(device_id)
        if known is not None:
            try:
                await authenticator.authenticate(*known, device_client_id(tenant_id, device_id))
            except Refused:
                pass
            else:
                working[device_id] = known
                continue
        try:
            issued = await client.devices.create_credential(device_id)
        except pc.FailedPrecondition as error:
            log.warning("no MQTT credential for demo device %s: %s", device_id, error)
            continue
        working[device_id] = (issued.username, issued.secret)
    _save(path, working)
    return working
