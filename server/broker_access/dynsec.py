"""Mosquitto 2's dynamic-security plugin, kept in step with the credentials in
the database.

Mosquitto checks CONNECTs and ACLs against its own list of clients
(dynamic-security.json), not against our database, so every credential is
copied into it as it is issued and deleted as it is revoked, through the
plugin's JSON API on `$CONTROL/dynamic-security/v1`, as the plugin's admin.

- `created`: a role per device (`pulse-device/{tenant}/{device}`) allowing
  exactly what `rules.allowed` allows a device (upstream's topics under the
  tenant's UUID and its external id, read from the database), and a client
  per credential: username `{tenant}/{device}/{credential}`, the secret as
  its password, its client id pinned to `{tenant}/{device}`. Both go in one
  control message, so the broker applies them together; an existing role
  gets the ACLs it lacks, so a new credential brings a device made under
  older rules up to date (as `ensure_service` does for services).
- `revoked`: deleteClient, which in Mosquitto 2.0 also disconnects the
  client's live connections (the plugin kicks by username).
- `reconcile`: the database is the truth for every username shaped like a
  Pulse identity; clients whose credential no longer works (revoked while the
  mirror was away, expired, device decommissioned, service deleted) are
  deleted. It runs at every (re)connection and every `sweep_s`, and it is what
  ends expired credentials in Mosquitto.

The plugin cannot say "a service may not use a device's client id" (a dynsec
client is pinned to one client id or to none), so services, which are ours,
are trusted not to; devices cannot take a service's session, since theirs is
pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shlex
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from server.broker_access.authenticator import Authenticator
from server.broker_access.rules import (
    DEVICE_PUBLISHES,
    DEVICE_PUBLISHES_UPSTREAM,
    DEVICE_RECEIVES,
    SERVICE_NAME,
    SERVICE_ROOTS,
    DeviceIdentity,
    Identity,
    ServiceIdentity,
    parse_username,
    service_username,
)
from server.credentials import store
from server.db import Database
from server.errors import BrokerUnavailable, NotFound
from server.mqtt_url import BrokerAddress
from server.registry import store as registry
from server.validation import ID_PATTERN
from server.wire import upstream_topic

log = logging.getLogger("pulse.broker_access.dynsec")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

SERVICE_ROLE = "pulse-service"
DEVICE_ROLE_PREFIX = "pulse-device/"

#: Where distributions put the plugin; `find_plugin` tries them in order.
PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)

# Deletions per control message: the broker answers a batch in one message,
# and a few hundred keeps that well under any size limit.
_BATCH = 200
_BACKOFF_MAX_S = 10.0


def find_plugin() -> str | None:
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def device_role(tenant_id: uuid.UUID, device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{tenant_id}/{device_id}"


def _parse_device_role(rolename: str) -> tuple[uuid.UUID, str] | None:
    if not rolename.startswith(DEVICE_ROLE_PREFIX):
        return None
    tenant, _, device = rolename[len(DEVICE_ROLE_PREFIX) :].partition("/")
    try:
        tenant_id = uuid.UUID(tenant)
    except ValueError:
        return None
    if str(tenant_id) != tenant or not ID_PATTERN.fullmatch(device):
        return None
    return tenant_id, device


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def device_acls(identity: DeviceIdentity, external_id: str | None = None) -> list[dict[str, Any]]:
    """What `rules.allowed` allows a device, as dynsec ACLs. Topics are
    literal (device ids cannot hold `+` or `#`), and the subscription is a
    subscribeLiteral: a wildcard filter matches no literal ACL, so it is
    refused like any other, as the rules want.

    The rules allow upstream's topics under any tenant id that maps to the
    device's tenant; ACLs cannot compute that, so they name the two a tenant
    has: its UUID and, given, its `external_id`."""
    device = identity.device_id
    acls = [_acl("publishClientSend", identity.topic(kind)) for kind in sorted(DEVICE_PUBLISHES)]
    acls += _receive_acls(identity.topic(DEVICE_RECEIVES))
    for tenant in [str(identity.tenant_id), *([external_id] if external_id else [])]:
        acls.append(
            _acl("publishClientSend", upstream_topic(tenant, device, DEVICE_PUBLISHES_UPSTREAM))
        )
        acls += _receive_acls(upstream_topic(tenant, device, DEVICE_RECEIVES))
    return acls


def _receive_acls(topic: str) -> list[dict[str, Any]]:
    return [_acl("subscribeLiteral", topic), _acl("publishClientReceive", topic)]


def service_acls() -> list[dict[str, Any]]:
    """Everything under `pulse/` and `tenant/`. The broker checks a shared
    subscription with its `$share/{group}/` prefix still on, hence the
    second pattern."""
    return [
        acl
        for root in SERVICE_ROOTS
        for acl in [
            _acl("publishClientSend", f"{root}/#"),
            _acl("publishClientReceive", f"{root}/#"),
            _acl("subscribePattern", f"{root}/#"),
            _acl("subscribePattern", f"$share/+/{root}/#"),
        ]
    ]


#: Default access the device isolation rests on: whatever no role allows is
#: refused. Receiving is left as configured (the setup steps deny it too);
#: with subscribing denied, a client receives only what a role let it
#: subscribe to.
_REQUIRED_DEFAULTS = {"publishClientSend": False, "subscribe": False}


class DynsecCommandError(Exception):
    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


def _checked(response: dict[str, Any], *, tolerate: Iterable[str] = ()) -> dict[str, Any]:
    error = response.get("error")
    if error is not None and error not in tolerate:
        raise DynsecCommandError(str(response.get("command", "?")), str(error))
    return response


def _role_commands(rolename: str, acls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make the role, then add each of its ACLs again: a role made before the
    rules last changed (upstream's topics, a tenant's external id set later)
    gets those it lacks; those it has are refused as existing."""
    return [
        {"command": "createRole", "rolename": rolename, "acls": acls},
        *({"command": "addRoleACL", "rolename": rolename, **acl} for acl in acls),
    ]


def _checked_role(responses: Sequence[dict[str, Any]]) -> None:
    """Check the answers to `_role_commands`."""
    role_response, *acl_responses = responses
    _checked(role_response, tolerate=["Role already exists"])
    for response in acl_responses:
        _checked(response, tolerate=["ACL with this topic already exists"])


@dataclass
class Reconciled:
    """What one reconciliation did."""

    checked: int = 0
    deleted_clients: list[str] = field(default_factory=list)
    deleted_roles: list[str] = field(default_factory=list)
    #: Clients with no credential row yet: perhaps one being issued right
    #: now, whose transaction has not committed. Deleted once `missing_grace_s`
    #: has passed since they were first seen so.
    waiting: list[str] = field(default_factory=list)


class MosquittoDynsec:
    """An AccessMirror for Mosquitto with the dynamic-security plugin.

    `admin` is the broker as the plugin's admin user (the one `mosquitto_ctrl
    dynsec init` creates). With `db`, the mirror reconciles at every
    connection and every `sweep_s`; without it, only when `reconcile` is
    called."""

    def __init__(
        self,
        admin: BrokerAddress,
        *,
        db: Database | None = None,
        timeout_s: float = 5.0,
        sweep_s: float = 60.0,
        missing_grace_s: float = 60.0,
    ) -> None:
        if not admin.username or admin.password is None:
            raise ValueError("the dynamic-security admin needs a username and password")
        self._admin = admin
        self._db = db
        self._timeout_s = timeout_s
        self._sweep_s = sweep_s
        self._missing_grace_s = missing_grace_s
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._missing_since: dict[str, float] = {}
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Future[None] | None = None
        # One reconciliation at a time: the sweep and one at reconnection
        # would otherwise race over the same clients.
        self._reconciling = asyncio.Lock()

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    async def start(self) -> None:
        """Connect, make sure of the default ACL access, reconcile (with a
        database), then keep the connection up in the background.

        A refused admin login raises, as it is a configuration mistake; an
        unreachable broker is logged and retried, and until it is reached
        issuing credentials fails with BROKER_UNAVAILABLE."""
        if self._task is not None:
            return
        self._first_attempt = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="dynsec-mirror")
        try:
            await self._first_attempt
        except Exception:
            await self.stop()
            raise

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- AccessMirror ---------------------------------------------------------

    async def created(self, identity: DeviceIdentity, secret: str) -> None:
        role = device_role(identity.tenant_id, identity.device_id)
        acls = device_acls(identity, await self._external_id(identity.tenant_id))
        try:
            *role_responses, client_response = await self._call(
                [
                    *_role_commands(role, acls),
                    {
                        "command": "createClient",
                        "username": identity.username,
                        "password": secret,
                        "clientid": identity.client_id,
                        "roles": [{"rolename": role}],
                    },
                ]
            )
            _checked_role(role_responses)
            _checked(client_response)
        except DynsecCommandError as error:
            raise BrokerUnavailable(f"Mosquitto refused {error}") from error

    async def _external_id(self, tenant_id: uuid.UUID) -> str | None:
        """The tenant's external id. Without a database, none: the role then
        grants upstream's topics under the tenant's UUID only."""
        if self._db is None:
            return None
        async with self._db.tenant(tenant_id, readonly=True) as con:
            found: str | None = await con.fetchval(
                "SELECT external_id FROM tenants WHERE tenant_id = $1", tenant_id
            )
        return found

    async def revoked(self, identities: Sequence[DeviceIdentity]) -> None:
        if identities:
            await self._delete_clients([identity.username for identity in identities])

    # -- services -------------------------------------------------------------

    async def ensure_service(self, name: str, secret: str) -> None:
        """A client `pulse-{name}` with `secret`, allowed everything under
        `pulse/`. An existing one is replaced, which disconnects it: its old
        secret no longer works in the database either."""
        if not SERVICE_NAME.fullmatch(name):
            raise ValueError(f"service name {name!r} is not one a service can have")
        username = service_username(name)
        try:
            *role_responses, delete_response, create_response = await self._call(
                [
                    *_role_commands(SERVICE_ROLE, service_acls()),
                    {"command": "deleteClient", "username": username},
                    {
                        "command": "createClient",
                        "username": username,
                        "password": secret,
                        "roles": [{"rolename": SERVICE_ROLE}],
                    },
                ]
            )
            _checked_role(role_responses)
            _checked(delete_response, tolerate=["Client not found"])
            _checked(create_response)
        except DynsecCommandError as error:
            raise BrokerUnavailable(f"Mosquitto refused {error}") from error

    # -- reconciliation -------------------------------------------------------

    async def clients(self) -> list[str]:
        """The usernames the plugin knows."""
        return await self._list("listClients", "clients")

    async def roles(self) -> list[str]:
        return await self._list("listRoles", "roles")

    async def reconcile(self, db: Database) -> Reconciled:
        """Delete the clients whose credential no longer works, and the roles
        of devices that are decommissioned or gone."""
        async with self._reconciling:
            return await self._reconcile(db)

    async def _reconcile(self, db: Database) -> Reconciled:
        result = Reconciled()
        usernames = await self.clients()
        claimed: dict[str, Identity] = {}
        for username in usernames:
            # Never the admin, whatever its name: the mirror would lock itself out.
            if username == self._admin.username:
                continue
            identity = parse_username(username)
            if identity is not None:
                claimed[username] = identity
        result.checked = len(claimed)
        active = await Authenticator(db).still_active(claimed.values())
        now = time.monotonic()
        doomed: list[str] = []
        for username, identity in claimed.items():
            if identity in active:
                self._missing_since.pop(username, None)
            elif await _has_record(db, identity):
                # Revoked, expired or decommissioned: a committed fact.
                doomed.append(username)
            else:
                first_seen = self._missing_since.setdefault(username, now)
                if now - first_seen >= self._missing_grace_s:
                    doomed.append(username)
                else:
                    result.waiting.append(username)
        for username in list(self._missing_since):
            if username not in claimed:
                del self._missing_since[username]
        result.deleted_clients = await self._delete_clients(doomed)
        for username in result.deleted_clients:
            self._missing_since.pop(username, None)
        remaining = set(usernames).difference(result.deleted_clients)
        result.deleted_roles = await self._delete_roles(await self._retired_roles(db, remaining))
        if result.deleted_clients or result.deleted_roles:
            log.info(
                "dynsec reconciliation: deleted %d clients, %d roles",
                len(result.deleted_clients),
                len(result.deleted_roles),
            )
        return result

    async def _retired_roles(self, db: Database, usernames: Iterable[str]) -> list[str]:
        """Device roles whose device is decommissioned or gone. Race-free
        against `created`: that runs with the device's row locked as ACTIVE,
        so once the device reads as retired no role can be handed out again."""
        retired: list[str] = []
        in_use = {
            (identity.tenant_id, identity.device_id)
            for identity in map(parse_username, usernames)
            if isinstance(identity, DeviceIdentity)
        }
        for rolename in await self.roles():
            parsed = _parse_device_role(rolename)
            # A role some client holds belongs to a device with a working
            # credential, or one about to be deleted by the next sweep.
            if parsed is None or parsed in in_use:
                continue
            tenant_id, device_id = parsed
            try:
                async with db.tenant(tenant_id, readonly=True) as con:
                    device = await registry.get_device(con, tenant_id, device_id)
            except NotFound:
                retired.append(rolename)
                continue
            if device.lifecycle != "ACTIVE":
                retired.append(rolename)
        return retired

    async def _delete_clients(self, usernames: Sequence[str]) -> list[str]:
        """Delete and so disconnect them; failures are logged, not raised,
        because the next reconciliation deletes what is left."""
        deleted: list[str] = []
        for start in range(0, len(usernames), _BATCH):
            chunk = usernames[start : start + _BATCH]
            try:
                responses = await self._call(
                    [{"command": "deleteClient", "username": u} for u in chunk]
                )
            except BrokerUnavailable as error:
                log.warning(
                    "could not delete %d Mosquitto clients (%s); reconciliation will",
                    len(chunk),
                    error.message,
                )
                return deleted
            for username, response in zip(chunk, responses, strict=True):
                try:
                    _checked(response, tolerate=["Client not found"])
                except DynsecCommandError as error:
                    log.warning("could not delete Mosquitto client %r: %s", username, error)
                else:
                    deleted.append(username)
        return deleted

    async def _delete_roles(self, rolenames: Sequence[str]) -> list[str]:
        deleted: list[str] = []
        for start in range(0, len(rolenames), _BATCH):
            chunk = rolenames[start : start + _BATCH]
            responses = await self._call(
                [{"command": "deleteRole", "rolename": name} for name in chunk]
            )
            for rolename, response in zip(chunk, responses, strict=True):
                try:
                    _checked(response, tolerate=["Role not found"])
                except DynsecCommandError as error:
                    log.warning("could not delete Mosquitto role %r: %s", rolename, error)
                else:
                    deleted.append(rolename)
        return deleted

    async def _list(self, command: str, key: str) -> list[str]:
        (response,) = await self._call([{"command": command, "verbose": False, "count": -1}])
        try:
            items = _checked(response)["data"][key]
        except DynsecCommandError as error:
            raise BrokerUnavailable(f"Mosquitto refused {error}") from error
        except (KeyError, TypeError):
            raise BrokerUnavailable(f"Mosquitto answered {command} oddly") from None
        return [str(item) for item in items]

    # -- the connection -------------------------------------------------------

    async def _call(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send `commands` in one control message; their responses, in order.
        Each carries its own correlationData, so any number of calls may be
        in flight, and responses to other admins (the plugin publishes them
        to every subscriber) are ignored."""
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected to Mosquitto")
        loop = asyncio.get_running_loop()
        keys = [secrets.token_hex(8) for _ in commands]
        futures = [loop.create_future() for _ in commands]
        self._pending.update(zip(keys, futures, strict=True))
        payload = json.dumps(
            {
                "commands": [
                    {**command, "correlationData": key}
                    for command, key in zip(commands, keys, strict=True)
                ]
            }
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                await client.publish(CONTROL_TOPIC, payload, qos=1)
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise BrokerUnavailable(
                f"Mosquitto did not answer within {self._timeout_s:g}s"
            ) from None
        except aiomqtt.MqttError as error:
            raise BrokerUnavailable(f"Mosquitto connection failed: {error}") from error
        finally:
            for key, future in zip(keys, futures, strict=True):
                self._pending.pop(key, None)
                if not future.done():
                    future.cancel()

    async def _run(self) -> None:
        backoff = 0.5
        sweeper: asyncio.Task[None] | None = None
        try:
            if self._db is not None:
                sweeper = asyncio.create_task(self._sweep_forever(self._db), name="dynsec-sweep")
            while True:
                try:
                    await self._connection()
                except aiomqtt.MqttCodeError as error:
                    if self._refused_login(error):
                        return
                    log.warning("Mosquitto admin connection: %s; retrying in %.1fs", error, backoff)
                except (aiomqtt.MqttError, BrokerUnavailable) as error:
                    log.warning("Mosquitto admin connection: %s; retrying in %.1fs", error, backoff)
                except Exception:
                    # A bug must not end the mirror: credentials would stop
                    # being issued with nothing but this log to say why.
                    log.exception("dynamic-security mirror failed; retrying in %.1fs", backoff)
                else:
                    backoff = 0.5
                self._settle_first_attempt()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        finally:
            self._settle_first_attempt()
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    def _refused_login(self, error: aiomqtt.MqttCodeError) -> bool:
        """Whether `error` is the broker refusing the admin login; if it is
        and this is the first attempt, start() raises it."""
        # 4/5 for MQTT 3.1.1 (bad username or password / not authorized);
        # 134/135 for the same refusals in MQTT 5.
        refused = getattr(error.rc, "value", error.rc) in (4, 5, 134, 135)
        if refused and self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_exception(
                PermissionError(
                    f"Mosquitto refused the dynamic-security admin {self._admin.username!r} "
                    f"at {self._admin.safe_url}: {error}"
                )
            )
            return True
        return False

    def _settle_first_attempt(self) -> None:
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(None)

    async def _connection(self) -> None:
        async with aiomqtt.Client(
            **self._admin.client_options(),
            # A fresh id each time: several servers may share one admin user.
            identifier=f"pulse-dynsec-{secrets.token_hex(6)}",
            clean_session=True,
            keepalive=30,
            timeout=self._timeout_s,
        ) as client:
            await client.subscribe(RESPONSE_TOPIC, qos=1)
            reader = asyncio.create_task(self._read(client), name="dynsec-responses")
            self._client = client
            try:
                await self._ensure_default_access()
                self._connected.set()
                log.info("dynamic-security mirror connected to %s", self._admin.safe_url)
                if self._db is not None:
                    # Revocations missed while disconnected are found here.
                    await self._reconcile_logged(self._db)
                self._settle_first_attempt()
                await reader
            finally:
                self._client = None
                self._connected.clear()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(BrokerUnavailable("lost the Mosquitto connection"))

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray | str):
                continue
            try:
                body = json.loads(payload)
                responses = body["responses"]
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable dynamic-security response: %.200r", payload)
                continue
            for response in responses:
                if not isinstance(response, dict):
                    continue
                future = self._pending.get(str(response.get("correlationData")))
                if future is not None and not future.done():
                    future.set_result(response)
        # The iterator ends only when the connection does.
        raise aiomqtt.MqttError("the connection ended")

    async def _ensure_default_access(self) -> None:
        (response,) = await self._call([{"command": "getDefaultACLAccess"}])
        try:
            current = {
                str(acl["acltype"]): bool(acl["allow"])
                for acl in _checked(response)["data"]["acls"]
            }
        except DynsecCommandError as error:
            raise BrokerUnavailable(f"Mosquitto refused {error}") from error
        except (KeyError, TypeError):
            raise BrokerUnavailable("Mosquitto answered getDefaultACLAccess oddly") from None
        loose = [name for name, allow in _REQUIRED_DEFAULTS.items() if current.get(name) != allow]
        if not loose:
            return
        log.warning(
            "Mosquitto allowed %s by default; setting it to deny, as device isolation needs",
            ", ".join(loose),
        )
        (response,) = await self._call(
            [
                {
                    "command": "setDefaultACLAccess",
                    "acls": [
                        {"acltype": name, "allow": _REQUIRED_DEFAULTS[name]} for name in loose
                    ],
                }
            ]
        )
        try:
            _checked(response)
        except DynsecCommandError as error:
            raise BrokerUnavailable(f"Mosquitto refused {error}") from error

    async def _reconcile_logged(self, db: Database) -> None:
        try:
            await self.reconcile(db)
        except BrokerUnavailable as error:
            log.warning("dynsec reconciliation failed: %s", error.message)
        except Exception:
            # The database may be briefly away; the next sweep tries again.
            log.exception("dynsec reconciliation failed")

    async def _sweep_forever(self, db: Database) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            if self._connected.is_set():
                await self._reconcile_logged(db)


async def _has_record(db: Database, identity: Identity) -> bool:
    """Whether the credential behind `identity` has a committed row at all
    (working or not)."""
    if isinstance(identity, ServiceIdentity):
        async with db.admin() as con:
            return await store.service_secret(con, identity.name) is not None
    async with db.tenant(identity.tenant_id, readonly=True) as con:
        found = await store.stored_secret(
            con, identity.tenant_id, identity.device_id, identity.credential_id
        )
    return found is not None


# -- setup --------------------------------------------------------------------


def mosquitto_conf(
    *,
    port: int = 1883,
    bind: str | None = None,
    config_file: str = "/var/lib/mosquitto/dynamic-security.json",
    plugin: str | None = None,
    persistence_dir: str | None = None,
) -> str:
    """The mosquitto.conf lines the mirror and the evaluator need."""
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    persistence = (
        [
            # Sessions, queued messages and retained desired state survive a
            # restart of the broker.
            "persistence true",
            f"persistence_location {persistence_dir.rstrip('/')}/",
        ]
        if persistence_dir
        else []
    )
    return "\n".join(
        [
            # One plugin and one policy for every listener.
            "per_listener_settings false",
            listener,
            "allow_anonymous false",
            f"plugin {plugin or find_plugin() or PLUGIN_CANDIDATES[0]}",
            f"plugin_opt_config_file {config_file}",
            # The evaluator's session keeps device messages while the
            # evaluator is away or its database stalls, and it takes at most
            # its receive maximum (PULSE_EVALUATOR_INFLIGHT) at a time;
            # Mosquitto's default queue (1000) would drop the rest of a burst.
            "max_queued_messages 1000000",
            *persistence,
            "",
        ]
    )


def setup_commands(
    *,
    config_file: str,
    admin_user: str,
    host: str = "127.0.0.1",
    port: int = 1883,
    password: str | None = None,
) -> tuple[list[str], list[list[str]]]:
    """The mosquitto_ctrl commands setting the broker up: the one to run
    before Mosquitto first starts, and those to run once it is up. Without
    `password` they ask for it."""
    init = ["mosquitto_ctrl", "dynsec", "init", config_file, admin_user]
    connect = ["mosquitto_ctrl", "-h", host, "-p", str(port), "-u", admin_user]
    if password is not None:
        init.append(password)
        connect += ["-P", password]
    after = [
        [*connect, "dynsec", "setDefaultACLAccess", acltype, "deny"]
        for acltype in ("publishClientSend", "publishClientReceive", "subscribe")
    ]
    return init, after


def config_text(
    *,
    port: int = 1883,
    config_file: str = "/var/lib/mosquitto/dynamic-security.json",
    admin_user: str = "dynsec-admin",
    plugin: str | None = None,
    host: str = "127.0.0.1",
) -> str:
    """What `pulse` prints for setting Mosquitto up with dynamic security."""
    init, after = setup_commands(
        config_file=config_file, admin_user=admin_user, host=host, port=port
    )
    lines = [
        "# mosquitto.conf",
        mosquitto_conf(
            port=port, config_file=config_file, plugin=plugin, persistence_dir="/var/lib/mosquitto"
        ),
        "# Once, before Mosquitto first starts (asks for the admin's password):",
        shlex.join(init),
        "",
        "# Once Mosquitto runs: nothing is allowed unless a role allows it.",
        *(shlex.join(command) for command in after),
        "",
        "# Then tell Pulse the admin (the server keeps Mosquitto's clients in step):",
        f"#   PULSE_MQTT_DYNSEC_URL=mqtt://{admin_user}:<password>@{host}:{port}",
        f"# (a name not starting with {service_username('')!r}, which services have).",
        "",
    ]
    return "\n".join(lines)
