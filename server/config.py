"""Settings, read once from the environment.

Every variable is optional: with none set, `pulse run` starts embedded servers
and keeps their data and a generated secret under `.data/`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from server.auth import ClaimRules, claim_keys, parse_role_map


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    #: PostgreSQL URL of a login that may run migrations (owner of the schema).
    #: None: start the embedded server under data_dir.
    database_url: str | None
    #: MQTT broker URL, mqtt[s]://[user:password@]host:port, the user being a
    #: service identity (`pulse service-credential`). None: start the
    #: embedded broker, with access control, and credentials of its own.
    mqtt_url: str | None
    data_dir: Path
    grpc_host: str
    #: 0 picks a free port.
    grpc_port: int
    #: Root secret: signs development tokens (HS256) and seals page tokens.
    secret: bytes
    jwt_audience: str
    #: PEM file of an RS256 public key; when set, HS256 tokens are refused.
    jwt_public_key_file: Path | None
    #: JWKS endpoint for RS256 keys; when set, HS256 tokens are refused.
    jwks_url: str | None
    #: Required `iss` of every token; None: the issuer is not checked.
    auth_issuer: str | None
    #: Which claims carry a token's tenant and roles, and which role an
    #: identity provider's role names grant here.
    auth_claims: ClaimRules
    db_pool_size: int
    log_level: str
    #: "text" (key=value, for people) or "json" (one object per line).
    log_format: str
    http_host: str
    #: The browser gateway's port; 0 picks a free one.
    http_port: int
    #: Origins allowed to call the gateway from a browser (CORS).
    cors_origins: tuple[str, ...]
    #: Largest request body the gateway accepts (413 beyond).
    http_max_body: int
    #: Liveness: an ONLINE device silent for longer than this becomes STALE
    #: (its connectivity status; not to be confused with twin_stale_after_s).
    liveness_stale_after_s: float = 30.0
    #: Liveness: how often the evaluator sweeps for stale devices.
    sweep_interval_s: float = 1.0
    #: Liveness: how long device messages are gathered into one batch write.
    liveness_flush_s: float = 0.1
    #: Liveness: a device's hold-down after a connection event: status
    #: changes within it wait until it is over, so a flapping device writes
    #: about one event per hold-down (0: no hold-down).
    liveness_flap_hold_s: float = 1.0
    #: Connection events older than this are removed by `pulse retention`.
    event_retention_days: int = 90
    #: Twins whose device has not applied a desired write for this long are
    #: STALE (their sync status).
    twin_stale_after_s: float = 300.0
    #: The evaluator's MQTT client id, and the shared-subscription group that
    #: several evaluators split the device topics in (none: one evaluator).
    evaluator_id: str = "pulse-evaluator"
    mqtt_shared_group: str | None = None
    #: Most device messages the evaluator holds unacknowledged (the broker
    #: keeps the rest), and how long the broker keeps its session while it is
    #: away (MQTT 5 brokers).
    evaluator_inflight: int = 1000
    evaluator_session_expiry_s: int = 86400
    #: Run the event loop on uvloop (when installed).
    uvloop: bool = True
    #: On SIGINT/SIGTERM: how long running calls may take to finish before
    #: they are cancelled; open streams end at once.
    shutdown_grace_s: float = 5.0
    #: gRPC: unary calls served at once by one process; beyond it a call is
    #: refused with RESOURCE_EXHAUSTED and a retry delay.
    grpc_max_concurrent_calls: int = 1000
    #: gRPC: open watch streams per caller (token subject) and per tenant.
    grpc_max_streams_per_caller: int = 100
    grpc_max_streams_per_tenant: int = 1000
    #: gRPC: connections with no call for this long are closed (keepalive
    #: pings from clients are allowed at most every 10 s).
    grpc_max_connection_idle_s: float = 300.0
    #: HTTP: a connection that has not sent a whole request head within this
    #: is closed; beyond max_connections new ones are answered 503.
    http_header_timeout_s: float = 10.0
    http_max_connections: int = 1000
    #: CA bundle to verify an mqtts:// broker with (default: the system's).
    mqtt_ca_file: str | None = None
    #: Mosquitto's dynamic-security admin, mqtt[s]://admin:password@host:port:
    #: when set, the server keeps Mosquitto's clients and roles in step with
    #: device credentials (`pulse broker-config mosquitto`).
    mqtt_dynsec_url: str | None = None
    #: Shared secret of the broker HTTP hooks (/mqtt/authn, /mqtt/authz);
    #: unset: the gateway does not serve them.
    broker_hook_secret: str | None = None
    #: Where processes without the HTTP gateway (serve, evaluator, rollouts)
    #: answer /metrics, /healthz and /readyz; None: each command's own
    #: default port (README), so that they can share a host.
    ops_host: str = "127.0.0.1"
    ops_port: int | None = None
    #: Set by `--workers N` for its workers: listen on the configured ports
    #: with SO_REUSEPORT, beside the other workers, never on another port.
    reuse_port: bool = False
    #: Publish desired state also on upstream's topic (`tenant/{t}/device/{d}/
    #: shadow/desired`, docs/upstream-devices.md) besides ours.
    upstream_desired: bool = True


def _load_or_create_secret(data_dir: Path) -> bytes:
    path = data_dir / "secret"
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(32)
    # Create with 0600 from the start rather than chmod after writing.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value.hex())
    return value


def _positive(env: dict[str, str], name: str, default: str) -> float:
    raw = env.get(name) or default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number (got {raw!r})") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive (got {raw!r})")
    return value


def _non_negative(env: dict[str, str], name: str, default: str) -> float:
    raw = env.get(name) or default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number (got {raw!r})") from None
    if not value >= 0:
        raise ValueError(f"{name} must be zero or more (got {raw!r})")
    return value


def _claim_path(env: dict[str, str], name: str, default: str) -> str:
    path = env.get(name) or default
    try:
        claim_keys(path)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return path


def _claim_rules(env: dict[str, str]) -> ClaimRules:
    try:
        role_map = parse_role_map(env.get("PULSE_AUTH_ROLE_MAP", ""))
    except ValueError as e:
        raise ValueError(f"PULSE_AUTH_ROLE_MAP: {e}") from None
    return ClaimRules(
        tenant=_claim_path(env, "PULSE_AUTH_TENANT_CLAIM", "tenant_id"),
        roles=_claim_path(env, "PULSE_AUTH_ROLES_CLAIM", "role"),
        role_map=role_map,
    )


_OFF = frozenset({"0", "false", "off", "no"})
_ON = frozenset({"", "1", "true", "on", "yes"})


def _switch(env: dict[str, str], name: str) -> bool:
    """An on/off setting that is on unless set to 0, false, off or no."""
    raw = env.get(name, "").strip().lower()
    if raw not in _OFF | _ON:
        raise ValueError(f"{name} must be 1/true/on or 0/false/off (got {raw!r})")
    return raw not in _OFF


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, the first by default."""
    raw = (env.get(name) or choices[0]).strip().lower()
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} (got {raw!r})")
    return raw


def load(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    data_dir = Path(env.get("PULSE_DATA_DIR", ".data")).resolve()
    raw_secret = env.get("PULSE_SECRET")
    secret = raw_secret.encode() if raw_secret else _load_or_create_secret(data_dir)
    if len(secret) < 32:
        raise ValueError("PULSE_SECRET must be at least 32 bytes")
    key_file = env.get("PULSE_JWT_PUBLIC_KEY_FILE")
    return Settings(
        database_url=env.get("DATABASE_URL") or None,
        mqtt_url=env.get("MQTT_URL") or None,
        data_dir=data_dir,
        grpc_host=env.get("PULSE_GRPC_HOST", "127.0.0.1"),
        grpc_port=int(env.get("PULSE_GRPC_PORT", "50051")),
        secret=secret,
        jwt_audience=env.get("PULSE_JWT_AUDIENCE", "pulse"),
        jwt_public_key_file=Path(key_file) if key_file else None,
        jwks_url=env.get("PULSE_JWKS_URL") or None,
        auth_issuer=env.get("PULSE_AUTH_ISSUER") or None,
        auth_claims=_claim_rules(env),
        db_pool_size=int(env.get("PULSE_DB_POOL_SIZE", "10")),
        log_level=env.get("PULSE_LOG_LEVEL", "INFO"),
        log_format=_choice(env, "PULSE_LOG_FORMAT", ("text", "json")),
        http_host=env.get("PULSE_HTTP_HOST", "127.0.0.1"),
        http_port=int(env.get("PULSE_HTTP_PORT", "8000")),
        cors_origins=tuple(o.strip() for o in env.get("PULSE_CORS_ORIGINS", "").split(",") if o),
        http_max_body=int(env.get("PULSE_HTTP_MAX_BODY", str(1 << 20))),
        liveness_stale_after_s=_positive(
            env,
            "PULSE_LIVENESS_STALE_AFTER_S",
            # The name before twins had a STALE of their own.
            env.get("PULSE_STALE_AFTER_S", "30"),
        ),
        sweep_interval_s=_positive(env, "PULSE_SWEEP_INTERVAL_S", "1"),
        liveness_flush_s=_positive(env, "PULSE_LIVENESS_FLUSH_S", "0.1"),
        liveness_flap_hold_s=_non_negative(env, "PULSE_LIVENESS_FLAP_HOLD_S", "1"),
        event_retention_days=int(env.get("PULSE_EVENT_RETENTION_DAYS", "90")),
        twin_stale_after_s=_positive(env, "PULSE_TWIN_STALE_AFTER_S", "300"),
        evaluator_id=env.get("PULSE_EVALUATOR_ID") or "pulse-evaluator",
        mqtt_shared_group=env.get("PULSE_MQTT_SHARED_GROUP") or None,
        evaluator_inflight=int(_positive(env, "PULSE_EVALUATOR_INFLIGHT", "1000")),
        evaluator_session_expiry_s=int(_positive(env, "PULSE_EVALUATOR_SESSION_EXPIRY_S", "86400")),
        uvloop=env.get("PULSE_UVLOOP", "1") != "0",
        shutdown_grace_s=_positive(env, "PULSE_SHUTDOWN_GRACE_S", "5"),
        grpc_max_concurrent_calls=int(_positive(env, "PULSE_GRPC_MAX_CONCURRENT_CALLS", "1000")),
        grpc_max_streams_per_caller=int(_positive(env, "PULSE_GRPC_MAX_STREAMS_PER_CALLER", "100")),
        grpc_max_streams_per_tenant=int(
            _positive(env, "PULSE_GRPC_MAX_STREAMS_PER_TENANT", "1000")
        ),
        grpc_max_connection_idle_s=_positive(env, "PULSE_GRPC_MAX_CONNECTION_IDLE_S", "300"),
        http_header_timeout_s=_positive(env, "PULSE_HTTP_HEADER_TIMEOUT_S", "10"),
        http_max_connections=int(_positive(env, "PULSE_HTTP_MAX_CONNECTIONS", "1000")),
        mqtt_ca_file=env.get("PULSE_MQTT_CA_FILE") or None,
        mqtt_dynsec_url=env.get("PULSE_MQTT_DYNSEC_URL") or None,
        broker_hook_secret=env.get("PULSE_BROKER_HOOK_SECRET") or None,
        upstream_desired=_switch(env, "PULSE_UPSTREAM_DESIRED"),
        ops_host=env.get("PULSE_OPS_HOST") or "127.0.0.1",
        ops_port=int(env["PULSE_OPS_PORT"]) if env.get("PULSE_OPS_PORT") else None,
        reuse_port=env.get("PULSE_REUSE_PORT") == "1",
    )


def replace_port(settings: Settings, port: int) -> Settings:
    return dataclasses.replace(settings, grpc_port=port)
