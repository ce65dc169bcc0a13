"""MQTT_URL, parsed once for every client we open (evaluator, simulator,
dynamic-security mirror, tests, benchmarks).

`mqtt://user:pass@host:port` or `mqtts://...` (TLS, port 8883 by default,
verified against the system's CAs or the `ca_file` setting,
PULSE_MQTT_CA_FILE). Username and password are URL-encoded in the URL
(`quote(secret, safe="")`), since secrets may hold any character.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiomqtt.Client."""
        options: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
        }
        if self.tls:
            options["tls_context"] = ssl.create_default_context(cafile=self.ca_file)
        return options

    def as_user(self, username: str, password: str) -> BrokerAddress:
        return replace(self, username=username, password=password)

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return urlunsplit((scheme, f"{auth}{self.host}:{self.port}", "", "", ""))

    @property
    def safe_url(self) -> str:
        """The URL without the password, for logs and banners."""
        return replace(self, password="***" if self.password else None).url


def parse(url: str, *, ca_file: str | None = None) -> BrokerAddress:
    parts = urlsplit(url)
    tls = _SCHEMES.get(parts.scheme)
    if tls is None or not parts.hostname:
        raise ValueError(
            f"MQTT_URL must look like mqtt://[user:password@]host:port or mqtts://..., "
            f"not {parts.scheme}://..."
        )
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError("MQTT_URL has a port that is not a number from 0 to 65535") from None
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        ca_file=ca_file,
    )
