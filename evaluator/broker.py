"""An embedded MQTT broker (amqtt, pure Python) for `make run` and tests when
MQTT_URL is unset. Good enough for a demo fleet; production uses a real broker
(Mosquitto, EMQX, ...) named by MQTT_URL."""

from __future__ import annotations

import logging
import socket

from amqtt.broker import Broker


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._broker: Broker | None = None

    async def start(self) -> str:
        """Start listening and return the broker's mqtt:// URL."""
        port = self._port or _free_port(self._host)
        # amqtt logs every connection at INFO.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        self._broker = Broker(
            {"listeners": {"default": {"type": "tcp", "bind": f"{self._host}:{port}"}}}
        )
        await self._broker.start()
        return f"mqtt://{self._host}:{port}"

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
