"""An embedded MQTT broker (amqtt, pure Python) for `make run` and tests when
MQTT_URL is unset. Good enough for a demo fleet; production uses a real broker
(Mosquitto, EMQX, ...) named by MQTT_URL.

With an `Authenticator` the broker enforces server/broker_access/rules.py: a
CONNECT is checked against the credentials in the database before amqtt
touches any session, every PUBLISH, SUBSCRIBE and delivery asks
`rules.allowed`, and live connections whose credential stops working are
closed within `recheck_s`. Without one it is open: only for benchmarks
comparing with and without access control.

amqtt 0.12 has no hook early enough for the CONNECT check (its plugins run
after a clean-session CONNECT has deleted the existing session and after a
client-id take-over), so `_AccessBroker` overrides private methods; hence the
`amqtt>=0.12.1,<0.13` pin.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import connack
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from server.broker_access import rules
from server.broker_access.authenticator import Authenticator, Refused

log = logging.getLogger("pulse.broker")

# Typed copies (amqtt ships no type information).
_BAD_USERNAME_PASSWORD: int = connack.BAD_USERNAME_PASSWORD
_NOT_AUTHORIZED: int = connack.NOT_AUTHORIZED
_SERVER_UNAVAILABLE: int = connack.SERVER_UNAVAILABLE

#: Where the CONNECT's identity is kept; amqtt's Session.attributes is meant
#: for this, and Session (it defines __eq__ only) cannot key a dict.
_IDENTITY = "pulse.identity"

#: Refusals that say nothing beyond "these credentials do not work"; the rest
#: come from a valid credential that may not do this (state, client id, will).
_BAD_CREDENTIALS = frozenset({"anonymous", "bad_username", "unknown_credential", "bad_secret"})


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _AccessBroker(Broker):  # type: ignore[misc]
    def __init__(
        self, config: dict[str, Any], authenticator: Authenticator | None, recheck_s: float
    ) -> None:
        super().__init__(config)
        self._authenticator = authenticator
        self._recheck_s = recheck_s
        self._recheck_task: asyncio.Task[None] | None = None
        # Connections by handler, not by client id: amqtt lets a clean-session
        # CONNECT replace a session without closing the older connection, and
        # that one must be closed on revocation too.
        self._live: dict[BrokerProtocolHandler, rules.Identity] = {}
        #: Refused publishes, subscriptions, deliveries and wills, and live
        #: connections closed because their credential stopped working.
        self.refused: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        await super().start()
        if self._authenticator is not None:
            self._recheck_task = asyncio.create_task(self._recheck_loop(self._authenticator))

    async def shutdown(self) -> None:
        if self._recheck_task is not None:
            self._recheck_task.cancel()
            await asyncio.gather(self._recheck_task, return_exceptions=True)
        await super().shutdown()

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, address: str, port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        if self._authenticator is None:
            opened: tuple[BrokerProtocolHandler, Session]
            opened = await super()._initialize_client_session(reader, writer, address, port)
            return opened
        # Replaces amqtt's version, which acts on the session store as soon as
        # CONNECT is read: the check must come first.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (AMQTTError, MQTTError, NoDataError) as exc:
            await writer.close()
            raise AMQTTError(f"no valid CONNECT from {address}:{port}: {exc}") from exc
        code = await self._check_connect(session)
        if code is not None:
            await connack.ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise AMQTTError(f"CONNECT from {address}:{port} refused ({code})")
        return handler, await self._resume(session)

    async def _check_connect(self, session: Session) -> int | None:
        """None after remembering the session's identity, else the CONNACK code."""
        assert self._authenticator is not None
        try:
            identity = await self._authenticator.authenticate(
                session.username, session.password, session.client_id
            )
        except Refused as refusal:
            log.info("refused CONNECT of %r: %s", session.client_id, refusal)
            return _BAD_USERNAME_PASSWORD if refusal.reason in _BAD_CREDENTIALS else _NOT_AUTHORIZED
        except Exception:
            log.exception("could not check the CONNECT of %r", session.client_id)
            return _SERVER_UNAVAILABLE
        # amqtt publishes a will without asking the topic filter.
        if session.will_flag and not rules.allowed(
            identity, rules.Action.PUBLISH, session.will_topic or ""
        ):
            self.refused["will"] += 1
            return _NOT_AUTHORIZED
        session.attributes[_IDENTITY] = identity
        return None

    async def _resume(self, session: Session) -> Session:
        """amqtt's session resolution, run only once the CONNECT has passed."""
        client_id: str = session.client_id  # amqtt generates one if it was empty
        identity = session.attributes[_IDENTITY]
        existing = self._sessions.get(client_id)
        if session.clean_session or existing is None:
            await self._delete_session(client_id)
            session.parent = 0
        else:
            old: Session = existing[0]
            # amqtt forgets will_retain here; the rest is its list.
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(old, name, getattr(session, name))
            old.attributes[_IDENTITY] = identity
            session = old
            session.parent = 1
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return session

    async def _authenticate(self, session: Session, _: object) -> bool:
        # Already decided in _initialize_client_session (no second scrypt).
        return self._authenticator is None or _IDENTITY in session.attributes

    async def _topic_filtering(self, session: Session, topic: str, action: AmqttAction) -> bool:
        if self._authenticator is None:
            return True
        identity: rules.Identity | None = session.attributes.get(_IDENTITY)
        if identity is not None and rules.allowed(identity, rules.Action(action.value), topic):
            return True
        # A refused PUBLISH is dropped (QoS 1 still acknowledged) and the
        # client stays connected, as with Mosquitto's ACLs for MQTT 3.1.1: a
        # device with a wrong topic in its firmware then does not turn into a
        # reconnect storm, and both brokers behave the same.
        self.refused[action.value] += 1
        return False

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt calls this on every CONNECT for every filter anyone holds,
        # which sent other clients' retained messages (every device's desired
        # document) to whoever connected: only the session's own filters count.
        a_filter = subscription[0]
        granted = next((q for s, q in self._subscriptions.get(a_filter, ()) if s is session), None)
        handler = self._get_handler(session)
        if granted is None or handler is None:
            return
        for topic, retained in self._retained_messages.items():
            if self._matches(topic, a_filter) and await self._topic_filtering(
                session, topic, AmqttAction.RECEIVE
            ):
                qos = min(granted, retained.qos or granted)
                # Handed to the broadcast loop rather than awaited: amqtt's
                # caller iterates self._subscriptions, which must not change
                # (another client subscribing) while this suspends.
                self._tasks_queue.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(topic, retained.data, qos, retain=True)
                    )
                )

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # What a persistent session missed while offline: amqtt sends it with
        # the retain flag set, which tells the receiver "old state replayed"
        # (the evaluator ignores retained reports) for messages that are in
        # fact new. MQTT sets the flag only for retained-topic replays.
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            sends.append(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))
        if sends:
            await asyncio.gather(*sends)

    async def _client_message_loop(self, session: Session, handler: BrokerProtocolHandler) -> None:
        # Registered only now: before the loop runs, closing the handler would
        # not end the connection.
        identity: rules.Identity | None = session.attributes.get(_IDENTITY)
        if identity is not None:
            self._live[handler] = identity
        try:
            await super()._client_message_loop(session, handler)
        finally:
            self._live.pop(handler, None)

    async def _recheck_loop(self, authenticator: Authenticator) -> None:
        while True:
            await asyncio.sleep(self._recheck_s)
            try:
                await self._close_inactive(authenticator)
            except Exception:
                # A database hiccup must not end the rechecks for good.
                log.exception("could not recheck the live MQTT connections")

    async def _close_inactive(self, authenticator: Authenticator) -> None:
        live = dict(self._live)
        active = await authenticator.still_active(set(live.values()))
        for handler, identity in live.items():
            if identity in active or handler not in self._live:
                continue
            log.info("closing the connection of %s: credential no longer active", identity)
            self.refused["inactive"] += 1
            # No will on behalf of a credential that no longer works.
            if handler.session is not None:
                handler.session.will_flag = False
            # Ends the message loop, which stops the handler and the socket.
            await handler.handle_connection_closed()


class EmbeddedBroker:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        authenticator: Authenticator | None = None,
        recheck_s: float = 1.0,
    ) -> None:
        self._host = host
        self._port = port
        self._authenticator = authenticator
        self._recheck_s = recheck_s
        self._broker: _AccessBroker | None = None

    @property
    def refused(self) -> collections.Counter[str]:
        """Refusals after CONNECT by reason (publish, subscribe, receive, will,
        inactive); refused CONNECTs are counted by the authenticator."""
        return self._broker.refused if self._broker is not None else collections.Counter()

    async def start(self) -> str:
        """Start listening and return the broker's mqtt:// URL."""
        port = self._port or _free_port(self._host)
        # amqtt logs every connection at INFO.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self._host}:{port}"}},
            # No $SYS publisher or anonymous-auth plugin: access is decided above.
            "plugins": {},
        }
        self._broker = _AccessBroker(config, self._authenticator, self._recheck_s)
        await self._broker.start()
        return f"mqtt://{self._host}:{port}"

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
