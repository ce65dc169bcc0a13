"""The MQTT access rules (server/broker_access/rules.py) for upstream's topics,
as pure functions, and the Mosquitto ACLs derived from them: a device may
report and hear its own twin under its tenant's UUID or external id, and
nothing of another device or tenant; services have both topic trees."""

from __future__ import annotations

import uuid

import pytest

from server import wire
from server.broker_access.dynsec import device_acls, service_acls
from server.broker_access.rules import Action, DeviceIdentity, ServiceIdentity, allowed
from server.tenants import tenant_uuid

EXTERNAL = "acme-industrial"
ACME = tenant_uuid(EXTERNAL)
DEVICE = DeviceIdentity(ACME, "SENSOR-1", "0123456789ab")
#: A tenant without an external id.
PLAIN = DeviceIdentity(uuid.uuid4(), "SENSOR-1", "0123456789ab")
SERVICE = ServiceIdentity("evaluator")


def shadow(tenant: str | uuid.UUID, device: str, which: str) -> str:
    return f"tenant/{tenant}/device/{device}/shadow/{which}"


@pytest.mark.parametrize("tenant", [EXTERNAL, str(ACME)])
def test_a_device_reports_and_hears_its_own_twin_under_either_tenant_id(tenant: str) -> None:
    assert allowed(DEVICE, Action.PUBLISH, shadow(tenant, "SENSOR-1", "reported"))
    for action in (Action.SUBSCRIBE, Action.RECEIVE):
        assert allowed(DEVICE, action, shadow(tenant, "SENSOR-1", "desired"))


@pytest.mark.parametrize(
    "topic",
    [
        shadow(EXTERNAL, "SENSOR-2", "reported"),  # another device of its tenant
        shadow(ACME, "SENSOR-2", "reported"),
        shadow("other-tenant", "SENSOR-1", "reported"),  # another tenant's device
        shadow(PLAIN.tenant_id, "SENSOR-1", "reported"),
        shadow(EXTERNAL, "SENSOR-1", "desired"),  # only services publish desired state
        shadow(EXTERNAL, "SENSOR-1", "other"),
        f"tenant/{EXTERNAL}/device/SENSOR-1/telemetry",
        f"tenant/{EXTERNAL}/device/SENSOR-1/shadow/reported/more",
        f"tenant/{EXTERNAL}/devices/SENSOR-1/shadow/reported",
        shadow("+", "SENSOR-1", "reported"),
        shadow(EXTERNAL, "+", "reported"),
    ],
)
def test_a_device_may_not_publish_elsewhere_in_upstreams_tree(topic: str) -> None:
    assert not allowed(DEVICE, Action.PUBLISH, topic)


@pytest.mark.parametrize(
    "topic_filter",
    [
        shadow(EXTERNAL, "SENSOR-2", "desired"),
        shadow("other-tenant", "SENSOR-1", "desired"),
        shadow(PLAIN.tenant_id, "SENSOR-1", "desired"),
        shadow(EXTERNAL, "SENSOR-1", "reported"),
        shadow("+", "SENSOR-1", "desired"),
        shadow(EXTERNAL, "+", "desired"),
        f"tenant/{EXTERNAL}/device/SENSOR-1/shadow/+",
        f"tenant/{EXTERNAL}/device/SENSOR-1/#",
        f"tenant/{EXTERNAL}/#",
        "tenant/#",
        f"$share/g/{shadow(EXTERNAL, 'SENSOR-1', 'desired')}",
    ],
)
def test_a_device_may_not_subscribe_to_or_receive_anything_else(topic_filter: str) -> None:
    for action in (Action.SUBSCRIBE, Action.RECEIVE):
        assert not allowed(DEVICE, action, topic_filter)


def test_a_tenant_without_external_id_has_its_uuid_only() -> None:
    own = shadow(PLAIN.tenant_id, "SENSOR-1", "reported")
    assert allowed(PLAIN, Action.PUBLISH, own)
    assert not allowed(PLAIN, Action.PUBLISH, shadow(EXTERNAL, "SENSOR-1", "reported"))


def test_pulse_topics_are_unchanged() -> None:
    assert allowed(DEVICE, Action.PUBLISH, DEVICE.topic("twin/reported"))
    assert allowed(DEVICE, Action.SUBSCRIBE, DEVICE.topic("twin/desired"))
    assert not allowed(DEVICE, Action.PUBLISH, wire.topic(ACME, "SENSOR-2", "twin/reported"))


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        (Action.PUBLISH, shadow(EXTERNAL, "ANY", "desired")),
        (Action.RECEIVE, shadow("anyone", "ANY", "reported")),
        (Action.SUBSCRIBE, wire.UPSTREAM_SUBSCRIPTION),
        (Action.SUBSCRIBE, f"$share/evaluators/{wire.UPSTREAM_SUBSCRIPTION}"),
        (Action.SUBSCRIBE, "tenant/#"),
    ],
)
def test_services_use_upstreams_tree(action: Action, topic: str) -> None:
    assert allowed(SERVICE, action, topic)


@pytest.mark.parametrize("topic", ["tenants/x", "tenant", "other/tenant/x", "#"])
def test_services_stay_within_the_two_trees(topic: str) -> None:
    assert not allowed(SERVICE, Action.PUBLISH, topic)
    assert not allowed(SERVICE, Action.SUBSCRIBE, topic)


_ACL_ACTIONS = {
    "publishClientSend": Action.PUBLISH,
    "subscribeLiteral": Action.SUBSCRIBE,
    "publishClientReceive": Action.RECEIVE,
}


def test_the_device_acls_are_the_rules_under_both_tenant_ids() -> None:
    acls = device_acls(DEVICE, EXTERNAL)
    for acl in acls:
        assert allowed(DEVICE, _ACL_ACTIONS[acl["acltype"]], acl["topic"]), acl
    topics = {(acl["acltype"], acl["topic"]) for acl in acls}
    for tenant in (EXTERNAL, str(ACME)):
        assert ("publishClientSend", shadow(tenant, "SENSOR-1", "reported")) in topics
        assert ("subscribeLiteral", shadow(tenant, "SENSOR-1", "desired")) in topics
        assert ("publishClientReceive", shadow(tenant, "SENSOR-1", "desired")) in topics


def test_without_an_external_id_the_acls_name_the_uuid_only() -> None:
    topics = {acl["topic"] for acl in device_acls(DEVICE)}
    assert shadow(ACME, "SENSOR-1", "reported") in topics
    assert not any(EXTERNAL in topic for topic in topics)


def test_the_service_acls_cover_both_trees_and_shared_subscriptions() -> None:
    patterns = {(acl["acltype"], acl["topic"]) for acl in service_acls()}
    for root in ("pulse", "tenant"):
        assert ("publishClientSend", f"{root}/#") in patterns
        assert ("publishClientReceive", f"{root}/#") in patterns
        assert ("subscribePattern", f"{root}/#") in patterns
        assert ("subscribePattern", f"$share/+/{root}/#") in patterns
