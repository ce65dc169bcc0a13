"""Which role may call which RPC: the one table, checked by the auth interceptor.

A method missing from the table is refused, so a new RPC is closed until it is
listed here. Health and reflection are open: probes and `grpcurl list` carry
no token.
"""

from __future__ import annotations

from server.auth import Role

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_REGISTRY = "/pulse.device.v1.DeviceRegistryService/"
_GROUPS = "/pulse.device.v1.DeviceGroupService/"
_TWIN = "/pulse.device.v1.TwinService/"
_CONNECTIVITY = "/pulse.device.v1.ConnectivityService/"
_ROLLOUTS = "/pulse.device.v1.RolloutService/"

REQUIRED_ROLE: dict[str, Role] = {
    _REGISTRY + "GetDevice": Role.VIEWER,
    _REGISTRY + "ListDevices": Role.VIEWER,
    _REGISTRY + "ListSites": Role.VIEWER,
    _REGISTRY + "CreateDevice": Role.OPERATOR,
    _REGISTRY + "UpdateDevice": Role.OPERATOR,
    _REGISTRY + "CreateSite": Role.ADMIN,
    _REGISTRY + "DecommissionDevice": Role.ADMIN,
    # A credential lets its holder speak as the device: issuing and revoking
    # them is an admin's; listing shows no secret.
    _REGISTRY + "ListDeviceCredentials": Role.VIEWER,
    _REGISTRY + "CreateDeviceCredential": Role.ADMIN,
    _REGISTRY + "RevokeDeviceCredential": Role.ADMIN,
    _GROUPS + "GetGroup": Role.VIEWER,
    _GROUPS + "ListGroups": Role.VIEWER,
    _GROUPS + "ListGroupMembers": Role.VIEWER,
    _GROUPS + "PreviewFilter": Role.VIEWER,
    _GROUPS + "ListDeviceGroups": Role.VIEWER,
    _GROUPS + "WatchGroupMembership": Role.VIEWER,
    _GROUPS + "ListTwinPaths": Role.VIEWER,
    _GROUPS + "CreateGroup": Role.OPERATOR,
    _GROUPS + "UpdateGroup": Role.OPERATOR,
    _GROUPS + "DeleteGroup": Role.OPERATOR,
    _GROUPS + "AddGroupMembers": Role.OPERATOR,
    _GROUPS + "RemoveGroupMembers": Role.OPERATOR,
    _TWIN + "GetTwin": Role.VIEWER,
    _TWIN + "GetTwinDelta": Role.VIEWER,
    _TWIN + "WatchTwin": Role.VIEWER,
    _TWIN + "UpdateDesired": Role.OPERATOR,
    _TWIN + "PatchDesired": Role.OPERATOR,
    _CONNECTIVITY + "ListConnectionEvents": Role.VIEWER,
    _CONNECTIVITY + "WatchConnectionEvents": Role.VIEWER,
    _ROLLOUTS + "GetRollout": Role.VIEWER,
    _ROLLOUTS + "ListRollouts": Role.VIEWER,
    _ROLLOUTS + "ListRolloutDevices": Role.VIEWER,
    _ROLLOUTS + "WatchRollout": Role.VIEWER,
    # A rollout writes the desired state of many devices: as UpdateDesired,
    # an operator's.
    _ROLLOUTS + "CreateRollout": Role.OPERATOR,
    _ROLLOUTS + "PauseRollout": Role.OPERATOR,
    _ROLLOUTS + "ResumeRollout": Role.OPERATOR,
    _ROLLOUTS + "CancelRollout": Role.OPERATOR,
}


def is_open(method: str) -> bool:
    service = method.lstrip("/").split("/", 1)[0]
    return service in OPEN_SERVICES
