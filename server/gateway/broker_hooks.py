"""HTTP authentication and authorisation hooks for brokers that ask a web
service who may connect and what it may do: EMQX 5's HTTP authenticator and
authorizer, and anything configured to speak the same (VerneMQ webhooks,
HiveMQ extensions, mosquitto-go-auth's HTTP backend). The decisions are the
ones every other broker integration makes: `Authenticator` checks the
credential against the database, `rules.allowed` decides each topic.

    POST /mqtt/authn  {"username", "password", "clientid"}
        -> {"result": "allow", "is_superuser": false} | {"result": "deny"}
           | {"result": "ignore"}
    POST /mqtt/authz  {"username", "clientid", "topic", "action"}
        -> {"result": "allow"} | {"result": "deny"} | {"result": "ignore"}

`action` is "publish" or "subscribe" (EMQX); mosquitto-go-auth sends `acc`
instead (1 receive, 2 publish, 3 both, 4 subscribe). Bodies are JSON or, for
mosquitto-go-auth's form mode, form-encoded.

"ignore" is for usernames outside our namespace: neither `pulse-...` nor
starting with a UUID (a tenant). They are not ours to refuse, so a broker can
chain to its other authenticators and authorizers (EMQX's dashboard users,
say). Everything inside our namespace, anonymous included, gets a decision:
"deny" for a malformed, unknown, wrong, revoked or expired credential. Nobody
is a superuser: services too are held to `pulse/` and `tenant/`.

Every call must carry the shared secret, `Authorization: Bearer <secret>`;
`Basic` with the secret as password is accepted too, because
mosquitto-go-auth cannot set headers but Go sends the user info of
`auth_opt_http_host user:secret@host` as Basic. Without it the answer is 401,
a body that cannot be parsed 400: brokers read a non-200 answer as "ignore",
so configure them to deny what no hook decided (EMQX:
`authorization.no_match = deny`). mosquitto-go-auth counts any 2xx as allow
in its default mode, so it needs `auth_opt_http_response_mode json`: every
answer also carries the `ok` field that mode reads.

Authorisation trusts the username: the broker authenticated it on CONNECT.
A revoked credential stops at the next CONNECT; closing a live connection
is for the broker's own API.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.broker_access.authenticator import Authenticator, Refused
from server.broker_access.rules import (
    Action,
    allowed,
    client_id_problem,
    in_namespace,
    parse_username,
)
from server.db import Database
from server.gateway.http_io import error_response, read_body

log = logging.getLogger("pulse.gateway.broker_hooks")

AUTHN_PATH = "/mqtt/authn"
AUTHZ_PATH = "/mqtt/authz"
MIN_SECRET_CHARS = 16

# mosquitto's access bits, as mosquitto-go-auth passes them in `acc`.
_ACC: dict[int, tuple[Action, ...]] = {
    1: (Action.RECEIVE,),
    2: (Action.PUBLISH,),
    3: (Action.RECEIVE, Action.PUBLISH),
    4: (Action.SUBSCRIBE,),
}
_ACTIONS = {"publish": (Action.PUBLISH,), "subscribe": (Action.SUBSCRIBE,)}


_Decide = Callable[[Mapping[str, object]], Awaitable[Response]]


class _BadRequest(Exception):
    pass


def _unauthenticated(message: str) -> JSONResponse:
    return error_response(
        401,
        grpc.StatusCode.UNAUTHENTICATED,
        message,
        {"WWW-Authenticate": 'Bearer realm="pulse broker hooks"'},
    )


def _answer(result: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"result": result, "ok": result == "allow", **extra})


def _digest(secret: str) -> bytes:
    # Digests have one length, so comparing them leaks not even the secret's.
    return hashlib.sha256(secret.encode()).digest()


def _text(fields: Mapping[str, object], name: str) -> str | None:
    value = fields.get(name)
    return value if isinstance(value, str) else None


def _actions(fields: Mapping[str, object]) -> tuple[Action, ...] | None:
    action = _text(fields, "action")
    if action is not None:
        return _ACTIONS.get(action.lower())
    acc = fields.get("acc")
    if isinstance(acc, str):
        return _ACC.get(int(acc)) if acc in ("1", "2", "3", "4") else None
    if isinstance(acc, int) and not isinstance(acc, bool):
        return _ACC.get(acc)
    return None


class BrokerHooks:
    """The hook routes, checking credentials in `db` for callers that know
    `secret`. The database is the caller's to close."""

    def __init__(self, db: Database, secret: str) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(
                f"the broker hooks' shared secret needs at least {MIN_SECRET_CHARS} characters"
            )
        # One for the gateway's life: it remembers secrets that passed scrypt.
        self.authenticator = Authenticator(db)
        self._secret = _digest(secret)

    def routes(self, *, max_body_bytes: int) -> list[Route]:
        async def authn(request: Request) -> Response:
            return await self._handle(request, max_body_bytes, self._authn)

        async def authz(request: Request) -> Response:
            return await self._handle(request, max_body_bytes, self._authz)

        # Every method routes here so that a broker set up with GET hears
        # 405, not the console's 404.
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return [
            Route(AUTHN_PATH, authn, methods=methods),
            Route(AUTHZ_PATH, authz, methods=methods),
        ]

    async def _handle(self, request: Request, max_body_bytes: int, decide: _Decide) -> Response:
        if request.method != "POST":
            response = error_response(
                405, grpc.StatusCode.UNIMPLEMENTED, "the broker hooks are called with POST"
            )
            response.headers["Allow"] = "POST"
            return response
        refusal = self._check_secret(request)
        if refusal is not None:
            return refusal
        body = await read_body(request, max_body_bytes)
        if body is None:
            return error_response(
                413,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request body is larger than {max_body_bytes} bytes",
            )
        try:
            fields = _parse(body, request)
        except _BadRequest as e:
            return error_response(400, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await decide(fields)

    def _check_secret(self, request: Request) -> Response | None:
        header = request.headers.get("authorization")
        if header is None:
            return _unauthenticated(
                "no Authorization header: send 'Authorization: Bearer <shared secret>'"
            )
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            presented = value.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            presented = decoded.partition(":")[2]
        else:
            return _unauthenticated("the Authorization header must be 'Bearer <shared secret>'")
        if not hmac.compare_digest(_digest(presented), self._secret):
            return _unauthenticated("wrong shared secret for the broker hooks")
        return None

    async def _authn(self, fields: Mapping[str, object]) -> Response:
        username = _text(fields, "username") or ""
        if username and not in_namespace(username):
            return _answer("ignore")
        try:
            identity = await self.authenticator.authenticate(
                username or None, _text(fields, "password"), _text(fields, "clientid") or ""
            )
        except Refused as refusal:
            log.info("authn denied %r: %s", username[:80], refusal)
            return _answer("deny")
        log.debug("authn allowed %s", identity.username)
        return _answer("allow", is_superuser=False)

    async def _authz(self, fields: Mapping[str, object]) -> Response:
        username = _text(fields, "username") or ""
        topic = _text(fields, "topic")
        actions = _actions(fields)
        if topic is None or actions is None:
            # A broker whose request template lacks a field: deny, loudly,
            # rather than answer 400, which brokers read as "no opinion".
            log.warning("authz without a topic or a known action/acc: %s", sorted(fields))
            return _answer("deny")
        if username and not in_namespace(username):
            return _answer("ignore")
        identity = parse_username(username)
        if identity is None:
            return _answer("deny")
        if client_id_problem(identity, _text(fields, "clientid") or "") is not None:
            return _answer("deny")
        if all(allowed(identity, action, topic) for action in actions):
            return _answer("allow")
        return _answer("deny")


def _parse(body: bytes, request: Request) -> dict[str, object]:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        try:
            text = body.decode()
        except UnicodeDecodeError as e:
            raise _BadRequest("the form body is not UTF-8") from e
        return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise _BadRequest(f"the body is not JSON: {e}") from e
    if not isinstance(fields, dict):
        raise _BadRequest("the body must be a JSON object")
    return fields
