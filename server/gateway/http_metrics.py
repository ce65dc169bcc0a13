"""Request counts and latency per route, as an ASGI middleware.

Routes are labelled by their template (`/customer/devices/{device_id}`),
never by the path itself, so the number of series stays fixed whatever
clients send. The gateway's dispatcher names the API route it matched in
the scope; other paths are one of the fixed ones or `other`, and so are
methods outside HTTP's usual ones.
"""

from __future__ import annotations

import time
from typing import Any

from server.observability import metrics

#: Where the dispatcher puts the template of the API route it matched.
ROUTE_KEY = "pulse.route"
_FIXED = frozenset(
    {"/openapi.json", "/metrics", "/healthz", "/readyz", "/mqtt/authn", "/mqtt/authz"}
)
# A client may send any method name; only these get series of their own.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Scope = dict[str, Any]
Receive = Any
Send = Any


class HttpMetrics:
    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self._observe(scope, status, time.perf_counter() - start)
                scope["pulse.observed"] = True
            await send(message)

        try:
            await self._app(scope, receive, observed_send)
        finally:
            if not scope.get("pulse.observed"):
                self._observe(scope, status, time.perf_counter() - start)

    @staticmethod
    def _observe(scope: Scope, status: int, elapsed: float) -> None:
        path = scope["path"]
        route = scope.get(ROUTE_KEY) or (path if path in _FIXED else "other")
        method = scope["method"] if scope["method"] in _METHODS else "other"
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_SECONDS.labels(method, route).observe(elapsed)
