"""Service identities (evaluator, simulator, dynamic-security mirror, ...):
their MQTT credentials, issued by `pulse service-credential` or by `pulse run`
for its own processes."""

from __future__ import annotations

from server.broker_access.rules import SERVICE_NAME, service_username
from server.credentials import hashing, store
from server.db import Database
from server.mqtt_url import BrokerAddress


async def issue(db: Database, name: str) -> str:
    """A new secret for service `name`, replacing any earlier one."""
    if not SERVICE_NAME.fullmatch(name):
        raise ValueError(
            f"service name {name!r}: lower-case letters, digits and '-', starting with a letter"
        )
    secret = hashing.new_secret()
    secret_hash = await hashing.hashed(secret)
    async with db.admin() as con:
        await store.set_service_secret(con, name, secret_hash)
    return secret


async def issue_address(db: Database, name: str, broker: BrokerAddress) -> BrokerAddress:
    """`broker` as service `name`, with a freshly issued secret."""
    return broker.as_user(service_username(name), await issue(db, name))
