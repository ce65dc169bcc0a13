"""The MQTT broker's HTTP hooks, called as EMQX 5's HTTP authenticator and
authorizer call them (JSON, the shared secret in a header it was configured
with) and as mosquitto-go-auth's HTTP backend does (form or JSON with `acc`,
the secret as Basic), against a gateway with the hooks on, the real server
and PostgreSQL."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pulse_client as pc
import pytest

from server.app import SERVICE_NAMES
from server.credentials import services
from server.db import Database
from server.gateway.broker_hooks import BrokerHooks
from server.gateway.serve import running_gateway
from tests.conftest import Tenant

SECRET = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
async def hooks_url(target: str, db: Database) -> AsyncIterator[str]:
    async with running_gateway(
        target,
        SERVICE_NAMES,
        host="127.0.0.1",
        port=0,
        max_body_bytes=64 * 1024,
        broker_hooks=BrokerHooks(db, SECRET),
    ) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def broker(hooks_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=hooks_url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=10
    ) as client:
        yield client


@dataclass(frozen=True)
class Device:
    tenant_id: uuid.UUID
    device_id: str
    credential_id: str
    username: str
    secret: str

    @property
    def client_id(self) -> str:
        return f"{self.tenant_id}/{self.device_id}"

    def topic(self, kind: str) -> str:
        return f"pulse/{self.tenant_id}/{self.device_id}/{kind}"


@pytest.fixture
async def device(client: pc.AsyncPulseClient, tenant: Tenant) -> Device:
    await client.devices.create("D1")
    cred = await client.devices.create_credential("D1")
    return Device(tenant.tenant_id, "D1", cred.credential_id, cred.username, cred.secret)


async def authn(broker: httpx.AsyncClient, **fields: str) -> dict[str, Any]:
    # EMQX's default body template, plus fields it can be configured to add.
    body = {"peerhost": "10.0.0.7", "protocol": "mqtt", **fields}
    response = await broker.post("/mqtt/authn", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer: dict[str, Any] = response.json()
    return answer


async def authz(
    broker: httpx.AsyncClient, username: str, clientid: str, topic: str, action: str
) -> str:
    response = await broker.post(
        "/mqtt/authz",
        json={
            "username": username,
            "clientid": clientid,
            "topic": topic,
            "action": action,
            "qos": 1,
            "retain": False,
        },
    )
    assert response.status_code == 200, response.text
    result: str = response.json()["result"]
    return result


async def test_a_device_authenticates_with_its_credential(
    broker: httpx.AsyncClient, device: Device
) -> None:
    answer = await authn(
        broker, username=device.username, password=device.secret, clientid=device.client_id
    )
    assert answer == {"result": "allow", "is_superuser": False, "ok": True}


async def test_authn_denies_what_is_ours_but_wrong(
    broker: httpx.AsyncClient, device: Device
) -> None:
    other_credential = f"{device.tenant_id}/{device.device_id}/{'0' * 12}"
    refused = [
        {"username": "", "password": "", "clientid": "anon-1"},  # anonymous
        {"clientid": "anon-2"},  # anonymous, fields left out
        {"username": device.username, "clientid": device.client_id},  # no password
        {"username": device.username, "password": "not-it", "clientid": device.client_id},
        {"username": other_credential, "password": device.secret, "clientid": device.client_id},
        {"username": device.username, "password": device.secret, "clientid": "other"},
        {"username": f"{device.tenant_id}/{device.device_id}", "password": device.secret},
        {"username": "pulse-nobody", "password": device.secret, "clientid": "svc-1"},
        {"username": "pulse-Not_A_Name", "password": device.secret, "clientid": "svc-1"},
    ]
    for fields in refused:
        assert await authn(broker, **fields) == {"result": "deny", "ok": False}, fields


async def test_a_revoked_credential_is_denied(
    broker: httpx.AsyncClient, client: pc.AsyncPulseClient, device: Device
) -> None:
    fields = {"username": device.username, "password": device.secret, "clientid": device.client_id}
    assert (await authn(broker, **fields))["result"] == "allow"
    await client.devices.revoke_credential(device.device_id, device.credential_id)
    # The secret passed scrypt a moment ago and is remembered; the revocation
    # must win regardless.
    assert (await authn(broker, **fields))["result"] == "deny"


async def test_usernames_outside_our_namespace_are_left_to_other_authenticators(
    broker: httpx.AsyncClient,
) -> None:
    answer = await authn(broker, username="dashboard-admin", password="x", clientid="c")
    assert answer == {"result": "ignore", "ok": False}
    assert await authz(broker, "dashboard-admin", "c", "pulse/#", "subscribe") == "ignore"


async def test_a_service_authenticates(broker: httpx.AsyncClient, db: Database) -> None:
    # A name of its own: reissuing "evaluator" would replace a secret other
    # tests in the session may rely on.
    name = f"test-{uuid.uuid4().hex[:10]}"
    secret = await services.issue(db, name)
    answer = await authn(broker, username=f"pulse-{name}", password=secret, clientid=name)
    assert answer == {"result": "allow", "is_superuser": False, "ok": True}
    device_shaped = f"{uuid.uuid4()}/D1"
    answer = await authn(broker, username=f"pulse-{name}", password=secret, clientid=device_shaped)
    assert answer["result"] == "deny"


async def test_the_evaluator_may_use_all_of_pulse_and_nothing_else(
    broker: httpx.AsyncClient,
) -> None:
    tenant = uuid.uuid4()
    decisions = {
        ("subscribe", "pulse/+/+/#"): "allow",
        ("subscribe", "$share/g/pulse/+/+/#"): "allow",
        ("publish", f"pulse/{tenant}/D1/twin/desired"): "allow",
        ("subscribe", "#"): "deny",
        ("subscribe", "$share/g/#"): "deny",
        ("subscribe", "$SYS/#"): "deny",
        ("publish", "elsewhere/x"): "deny",
    }
    for (action, topic), expected in decisions.items():
        got = await authz(broker, "pulse-evaluator", "pulse-evaluator", topic, action)
        assert got == expected, (action, topic)
    device_shaped = f"{tenant}/D1"
    got = await authz(broker, "pulse-evaluator", device_shaped, "pulse/+/+/#", "subscribe")
    assert got == "deny"


def _other_device(d: Device) -> str:
    return f"pulse/{d.tenant_id}/D2/heartbeat"


def _other_tenant(d: Device) -> str:
    return f"pulse/{uuid.uuid4()}/{d.device_id}/heartbeat"


def _own(kind: str) -> Callable[[Device], str]:
    return lambda d: d.topic(kind)


@pytest.mark.parametrize(
    ("action", "topic_of", "expected"),
    [
        ("publish", _own("heartbeat"), "allow"),
        ("publish", _own("status"), "allow"),
        ("publish", _own("twin/reported"), "allow"),
        ("publish", _own("telemetry"), "allow"),
        ("publish", _own("twin/desired"), "deny"),
        ("publish", _own("something/else"), "deny"),
        ("publish", _other_device, "deny"),
        ("publish", _other_tenant, "deny"),
        ("subscribe", _own("twin/desired"), "allow"),
        ("subscribe", _own("#"), "deny"),
        ("subscribe", _own("heartbeat"), "deny"),
        ("subscribe", lambda d: "pulse/#", "deny"),
        ("subscribe", lambda d: f"pulse/{d.tenant_id}/D2/twin/desired", "deny"),
        ("subscribe", lambda d: f"$share/g/{d.topic('twin/desired')}", "deny"),
    ],
    ids=[
        "publish-heartbeat",
        "publish-status",
        "publish-reported",
        "publish-telemetry",
        "publish-desired",
        "publish-unknown-kind",
        "publish-other-device",
        "publish-other-tenant",
        "subscribe-desired",
        "subscribe-own-wildcard",
        "subscribe-own-heartbeat",
        "subscribe-everything",
        "subscribe-other-device",
        "subscribe-shared-desired",
    ],
)
async def test_device_authz(
    broker: httpx.AsyncClient,
    device: Device,
    action: str,
    topic_of: Callable[[Device], str],
    expected: str,
) -> None:
    got = await authz(broker, device.username, device.client_id, topic_of(device), action)
    assert got == expected


async def test_authz_holds_a_device_to_its_client_id(
    broker: httpx.AsyncClient, device: Device
) -> None:
    topic = device.topic("heartbeat")
    assert await authz(broker, device.username, device.client_id, topic, "publish") == "allow"
    assert await authz(broker, device.username, "someone-else", topic, "publish") == "deny"
    assert await authz(broker, "", device.client_id, topic, "publish") == "deny"


async def test_mosquitto_go_auth_http_backend(hooks_url: str, device: Device) -> None:
    # go-auth cannot set headers; it is pointed at user:secret@host, which Go
    # sends as Basic. Form mode, json response mode.
    async with httpx.AsyncClient(
        base_url=hooks_url, auth=("mosquitto", SECRET), timeout=10
    ) as go_auth:
        user = {"username": device.username, "clientid": device.client_id}
        response = await go_auth.post("/mqtt/authn", data={**user, "password": device.secret})
        assert response.status_code == 200
        assert response.json()["ok"] is True
        decisions = [
            (4, device.topic("twin/desired"), True),  # subscribe
            (1, device.topic("twin/desired"), True),  # receive
            (2, device.topic("heartbeat"), True),  # publish
            (2, device.topic("twin/desired"), False),
            (3, device.topic("twin/desired"), False),  # needs publish too
            (1, device.topic("heartbeat"), False),
            (4, "pulse/#", False),
            (5, device.topic("heartbeat"), False),
        ]
        for acc, topic, ok in decisions:
            form = await go_auth.post("/mqtt/authz", data={**user, "topic": topic, "acc": str(acc)})
            as_json = await go_auth.post("/mqtt/authz", json={**user, "topic": topic, "acc": acc})
            for response in (form, as_json):
                assert response.status_code == 200
                assert response.json()["ok"] is ok, (acc, topic)


@pytest.mark.parametrize("path", ["/mqtt/authn", "/mqtt/authz"])
async def test_the_hooks_need_the_shared_secret(hooks_url: str, path: str) -> None:
    body = {"username": "pulse-evaluator", "clientid": "c", "topic": "pulse/#", "action": "publish"}
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "no Authorization header"),
        ({"Authorization": "Bearer " + SECRET[:-1]}, "wrong shared secret"),
        ({"Authorization": "Bearer " + SECRET + "x"}, "wrong shared secret"),
        ({"Authorization": "Bearer"}, "wrong shared secret"),
        ({"Authorization": "Basic !!!"}, "wrong shared secret"),
        ({"Authorization": f"Token {SECRET}"}, "must be 'Bearer <shared secret>'"),
    ]
    async with httpx.AsyncClient(base_url=hooks_url, timeout=10) as anyone:
        for headers, message in cases:
            response = await anyone.post(path, json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith("Bearer")
            error = response.json()["error"]
            assert error["status"] == "UNAUTHENTICATED"
            assert message in error["message"]


async def test_bodies_are_checked_as_everywhere_in_the_gateway(
    broker: httpx.AsyncClient,
) -> None:
    headers = {"Content-Type": "application/json"}
    response = await broker.post("/mqtt/authn", content=b'{"username": ', headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    response = await broker.post("/mqtt/authz", content=b"[1, 2]", headers=headers)
    assert response.status_code == 400
    assert "JSON object" in response.json()["error"]["message"]
    response = await broker.post("/mqtt/authz", content=b"[" * 100_000, headers=headers)
    assert response.status_code == 413
    response = await broker.post("/mqtt/authz", content=b"[" * 60_000, headers=headers)
    assert response.status_code == 400
    # A template without the action is a broker misconfigured: deny, not 400,
    # which a broker would read as "no opinion".
    response = await broker.post(
        "/mqtt/authz", json={"username": "pulse-evaluator", "clientid": "c", "topic": "pulse/x"}
    )
    assert response.json()["result"] == "deny"
    assert (await broker.get("/mqtt/authn")).status_code == 405


async def test_the_hooks_are_off_unless_configured(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/mqtt/authn",
        json={"username": "pulse-evaluator", "password": "x", "clientid": "c"},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    assert response.status_code in (404, 405)


async def test_a_short_shared_secret_is_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        BrokerHooks(db, "too-short")
