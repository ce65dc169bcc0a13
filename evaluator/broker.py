"""An embedded MQTT broker (amqtt, pure Python) for `make run` and tests when
MQTT_URL is unset. Good enough for a demo fleet; production uses a real broker
(Mosquitto, EMQX, ...) named by MQTT_URL.

With an `Authenticator` the broker enforces server/broker_access/rules.py: a
CONNECT is checked against the credentials in the database before amqtt
touches any session, every PUBLISH, SUBSCRIBE and delivery asks
`rules.allowed`, and live connections whose credential stops working are
closed within `recheck_s`. Without one it is open: only for benchmarks
comparing with and without access control.

Deliveries are made for a subscriber that acknowledges QoS 1 only once it
has stored the message (the evaluator), with or without an authenticator:

- At most `max_inflight` QoS 1/2 deliveries per session are unacknowledged
  (Mosquitto's max_inflight_messages); the rest wait in the broker, in
  publish order, and go out as acknowledgements free slots. amqtt pushed
  every message at once and forgot any whose PUBACK took over 5 s.
- The deliveries and the waiting messages belong to the session, not to the
  connection: when a persistent session's connection ends without
  acknowledging them (crash, cut, take-over by a new connection), the next
  connection gets the unacknowledged ones again (DUP) and then the rest, in
  order, with what was published meanwhile. amqtt dropped them with the
  connection, and a take-over left the session marked disconnected.
- A connection silent for 1.5 times its keep-alive is closed (amqtt never
  did, so a connection that died without a FIN stayed "connected").
- A persistent session whose client stays away `session_expiry_s` is deleted
  with everything queued for it.
- A CONNECT of another protocol level (MQTT 5) gets CONNACK 1 (unacceptable
  protocol version) at once, so that a client can fall back to 3.1.1. amqtt
  parsed it as 3.1.1: given a user name it waited for bytes that never came,
  given a will it closed the connection without a CONNACK.

amqtt 0.12 has no hook early enough for the CONNECT check (its plugins run
after a clean-session CONNECT has deleted the existing session and after a
client-id take-over) nor for any of the above, so `_AccessBroker` and
`_DeliveryHandler` override private methods; hence the `amqtt>=0.12.1,<0.13`
pin.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import BufferReader, ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.codecs_amqtt import read_or_raise
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt import connack
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import OutgoingApplicationMessage, Session

from server.broker_access import rules
from server.broker_access.authenticator import Authenticator, Refused

log = logging.getLogger("pulse.broker")

# Typed copies (amqtt ships no type information).
_BAD_USERNAME_PASSWORD: int = connack.BAD_USERNAME_PASSWORD
_NOT_AUTHORIZED: int = connack.NOT_AUTHORIZED
_SERVER_UNAVAILABLE: int = connack.SERVER_UNAVAILABLE
_UNACCEPTABLE_PROTOCOL_VERSION: int = connack.UNACCEPTABLE_PROTOCOL_VERSION

#: The protocol level of MQTT 3.1.1, the only one amqtt speaks.
_MQTT_3_1_1 = 4
#: The largest valid 3.1.1 CONNECT: a 10-byte variable header and five
#: strings (client id, will topic and message, user name, password).
_MAX_CONNECT = 10 + 5 * (2 + 0xFFFF)

#: Where the CONNECT's identity is kept; amqtt's Session.attributes is meant
#: for this, and Session (it defines __eq__ only) cannot key a dict.
_IDENTITY = "pulse.identity"
#: The session's `_Outbox`: in the session, so that what waits for delivery
#: outlives a connection and goes away with the session.
_OUTBOX = "pulse.outbox"
#: The connection (its handler) that last took the session.
_OWNER = "pulse.owner"
#: The event loop's time when the session's client disconnected.
_DISCONNECTED_AT = "pulse.disconnected_at"

#: Refusals that say nothing beyond "these credentials do not work"; the rest
#: come from a valid credential that may not do this (state, client id, will).
_BAD_CREDENTIALS = frozenset({"anonymous", "bad_username", "unknown_credential", "bad_secret"})


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class SessionState:
    """What the broker holds for a client id (see `EmbeddedBroker.session`)."""

    connected: bool
    #: QoS 1/2 deliveries sent and not yet acknowledged.
    unacknowledged: int
    #: QoS 1/2 messages waiting for a free slot or for the client to return.
    queued: int


class _Outbox:
    """A session's QoS 1/2 messages not yet sent, in publish order. Sent ones
    are in amqtt's `session.inflight_out` (its packet ids avoid those) until
    acknowledged."""

    def __init__(self) -> None:
        self.waiting: collections.deque[OutgoingApplicationMessage] = collections.deque()
        #: Set when a message arrives or a slot frees.
        self.wakeup = asyncio.Event()

    @staticmethod
    def of(session: Session) -> _Outbox:
        outbox: _Outbox | None = session.attributes.get(_OUTBOX)
        if outbox is None:
            outbox = session.attributes[_OUTBOX] = _Outbox()
        return outbox

    def add(self, session: Session, message: OutgoingApplicationMessage) -> None:
        # Whatever amqtt queued while the client was away was published
        # before this, even if the reconnection has not handed it over yet.
        self.take_offline(session)
        self.waiting.append(message)
        self.wakeup.set()

    def take_offline(self, session: Session) -> None:
        """Move what amqtt queued for the disconnected session behind the rest."""
        queue = session.retained_messages
        while not queue.empty():
            queued = queue.get_nowait()
            # Not retained: amqtt's flag here told the receiver "old state
            # replayed" (the evaluator ignores retained reports) for messages
            # that are in fact new. MQTT sets it only for retained-topic replays.
            self.waiting.append(
                OutgoingApplicationMessage(None, queued.topic, queued.qos, queued.data, False)
            )
        self.wakeup.set()

    def queued(self, session: Session) -> int:
        return len(self.waiting) + int(session.retained_messages.qsize())


class _DeliveryHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's connection handler with QoS 1/2 deliveries through the
    session's `_Outbox`: a sender task per connection keeps at most
    `max_inflight` of them unacknowledged, and the acknowledgements free the
    slots. amqtt started one task per delivery that waited 5 s for the
    acknowledgement and then, like a closing connection, forgot the message."""

    def __init__(self, plugins_manager: PluginManager, max_inflight: int) -> None:
        super().__init__(plugins_manager)
        self._max_inflight = max_inflight
        self._sender: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    def _session(self) -> Session:
        if self.session is None:
            raise AMQTTError("the handler has no session")
        return self.session

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        """Queue a delivery; unlike amqtt's, this does not wait for the
        acknowledgement (amqtt's callers only schedule it)."""
        if qos not in (QOS_1, QOS_2):
            sent: OutgoingApplicationMessage
            sent = await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
            return sent
        session = self._session()
        message = OutgoingApplicationMessage(None, topic, qos, data, retain)
        _Outbox.of(session).add(session, message)
        return message

    async def _retry_deliveries(self) -> None:
        # Called by start() once the connection is up. amqtt resent the
        # unacknowledged deliveries here and waited (10 s at most) for their
        # acknowledgements before serving the connection; the sender resends
        # them first instead.
        session = self._session()
        self._sender = asyncio.create_task(self._send(session))
        incoming = list(session.inflight_in.values())
        if incoming:
            # Half-received QoS 2 publishes from the client: amqtt's handling.
            flows = [
                asyncio.create_task(asyncio.wait_for(self._handle_message_flow(m), 10))
                for m in incoming
            ]
            await asyncio.wait(flows)

    async def _send(self, session: Session) -> None:
        outbox = _Outbox.of(session)
        try:
            for message in list(session.inflight_out.values()):
                await self._send_packet(self._resend_packet(message))
            while True:
                while outbox.waiting and len(session.inflight_out) < self._max_inflight:
                    message = outbox.waiting.popleft()
                    message.packet_id = session.next_packet_id
                    message.publish_packet = message.build_publish_packet()
                    # In flight before the write: if the connection fails
                    # during it, the next connection resends the message.
                    session.inflight_out[message.packet_id] = message
                    await self._send_packet(message.publish_packet)
                outbox.wakeup.clear()
                await outbox.wakeup.wait()
        except Exception as error:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # amqtt's _send_packet turns the cancellation by stop() into
                # an error.
                return
            if _peer_gone(error):
                # Not a fault: the messages stay in flight for its next session.
                log.info("%r disconnected while messages were sent to it", session.client_id)
            else:
                log.exception("could not deliver to %r; closing its connection", session.client_id)
            await self.handle_connection_closed()

    @staticmethod
    def _resend_packet(message: OutgoingApplicationMessage) -> PublishPacket | PubrelPacket:
        if message.qos == QOS_2 and message.pubrec_packet is not None:
            # Received: only its release is missing [MQTT-4.4.0-1].
            pubrel: PubrelPacket = PubrelPacket.build(message.packet_id)
            return pubrel
        packet: PublishPacket = message.build_publish_packet(dup=True)
        message.publish_packet = packet
        return packet

    def _acknowledged(self, packet_id: int, qos: int) -> None:
        session = self._session()
        message = session.inflight_out.get(packet_id)
        if message is None or message.qos != qos:
            log.warning("%r acknowledged unknown delivery %d", session.client_id, packet_id)
            return
        del session.inflight_out[packet_id]
        _Outbox.of(session).wakeup.set()

    async def handle_puback(self, puback: PubackPacket) -> None:
        self._acknowledged(puback.variable_header.packet_id, QOS_1)

    async def handle_pubrec(self, pubrec: PubrecPacket) -> None:
        session = self._session()
        message = session.inflight_out.get(pubrec.packet_id)
        if message is None or message.qos != QOS_2:
            log.warning("%r received unknown delivery %d", session.client_id, pubrec.packet_id)
            return
        message.pubrec_packet = pubrec
        await self._send_packet(PubrelPacket.build(pubrec.packet_id))

    async def handle_pubcomp(self, pubcomp: PubcompPacket) -> None:
        self._acknowledged(pubcomp.packet_id, QOS_2)

    def handle_read_timeout(self) -> None:
        # amqtt ignores it, so a connection that died without a FIN (network
        # cut) stayed "connected", its session never expiring.
        log.info(
            "closing the connection of %r: silent past its keep-alive", self._session().client_id
        )
        if self._closing is None:
            self._closing = asyncio.create_task(self.handle_connection_closed())

    async def stop(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None and sender is not asyncio.current_task():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await super().stop()


class _AccessBroker(Broker):  # type: ignore[misc]
    def __init__(
        self,
        config: dict[str, Any],
        authenticator: Authenticator | None,
        recheck_s: float,
        max_inflight: int,
        session_expiry_s: float,
    ) -> None:
        super().__init__(config)
        self._authenticator = authenticator
        self._recheck_s = recheck_s
        self._max_inflight = max_inflight
        self._session_expiry_s = session_expiry_s
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
        # amqtt's parser reads only this copy of the CONNECT; the connection
        # goes on with `reader`, now just past it.
        connect = await self._read_connect(reader, writer, address, port)
        if self._authenticator is None:
            session: Session
            _, session = await super()._initialize_client_session(connect, writer, address, port)
        else:
            # Replaces amqtt's version, which acts on the session store as
            # soon as CONNECT is read: the check must come first.
            try:
                _, session = await BrokerProtocolHandler.init_from_connect(
                    connect, writer, self.plugins_manager
                )
            except (AMQTTError, MQTTError, NoDataError) as exc:
                await writer.close()
                raise AMQTTError(f"no valid CONNECT from {address}:{port}: {exc}") from exc
            code = await self._check_connect(session)
            if code is not None:
                await connack.ConnackPacket.build(0, code).to_stream(writer)
                await writer.close()
                raise AMQTTError(f"CONNECT from {address}:{port} refused ({code})")
            session = await self._resume(session)
        # amqtt builds its own handler class, whatever the path.
        handler = _DeliveryHandler(self.plugins_manager, self._max_inflight)
        # Claimed with no await since the session was looked up: an older
        # connection's disconnect, even one under way, now leaves it alone.
        session.attributes[_OWNER] = handler
        # amqtt's reader times out after this (plus its delay setting, 0),
        # which now closes the connection: one and a half [MQTT-3.1.2-24].
        session.keep_alive += (session.keep_alive + 1) // 2
        return handler, session

    async def _read_connect(
        self, reader: ReaderAdapter, writer: WriterAdapter, address: str, port: int
    ) -> ReaderAdapter:
        """The first packet, whole, or CONNACK 1 if it is a CONNECT of
        another protocol level: amqtt parses any CONNECT as 3.1.1, and MQTT 5
        puts properties after the keep-alive. Parsed from a buffer, a field
        that seems longer than the packet no longer waits on the socket."""
        try:
            fixed = await MQTTFixedHeader.from_stream(reader)
            if fixed is None:
                raise NoDataError("no CONNECT")
            if fixed.remaining_length > _MAX_CONNECT:
                raise MQTTError(f"a first packet of {fixed.remaining_length} bytes")
            body = await read_or_raise(reader, fixed.remaining_length)
        except (MQTTError, NoDataError) as exc:
            await writer.close()
            raise AMQTTError(f"no valid CONNECT from {address}:{port}: {exc}") from exc
        name_length = int.from_bytes(body[:2], "big")
        if fixed.packet_type == CONNECT and len(body) > 2 + name_length:
            level = body[2 + name_length]
            if level != _MQTT_3_1_1:
                await connack.ConnackPacket.build(0, _UNACCEPTABLE_PROTOCOL_VERSION).to_stream(
                    writer
                )
                await writer.close()
                raise AMQTTError(
                    f"MQTT protocol level {level} from {address}:{port} refused"
                    " (this broker speaks MQTT 3.1.1; clients such as the evaluator fall back)"
                )
        reread: ReaderAdapter = BufferReader(fixed.to_bytes() + body)
        return reread

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
        # What a persistent session missed while offline, behind what was
        # still waiting when it left and without amqtt's retain flag.
        _Outbox.of(session).take_offline(session)

    async def _handle_disconnect(
        self,
        session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        # amqtt's, except for a connection whose session a newer connection
        # took over: amqtt marked the session disconnected though the newer
        # one was using it (it then queued instead of delivering), and sent
        # as will the newer connection's, which had replaced it.
        if (
            session.attributes.get(_OWNER) is handler
            and session.will_flag
            and not isinstance(disconnect_waiter.result(), DisconnectPacket)
        ):
            await self._broadcast_message(
                session, session.will_topic, session.will_message, session.will_qos
            )
            if session.will_retain:
                await self.retain_message(
                    session, session.will_topic, session.will_message, session.will_qos
                )
        await self._stop_handler(handler)
        # Checked again: the take-over may have happened while this waited.
        if session.attributes.get(_OWNER) is not handler:
            return
        session.transitions.disconnect()
        session.attributes[_DISCONNECTED_AT] = asyncio.get_running_loop().time()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=session.client_id, client_session=session
        )

    async def _session_monitor(self) -> None:
        # Replaces amqtt's, which counts whole seconds of wall-clock time and
        # awaits between choosing a session and deleting it (its client may
        # reconnect meanwhile).
        sweep_s = min(1.0, max(0.05, self._session_expiry_s / 4))
        while True:
            await asyncio.sleep(sweep_s)
            try:
                self._expire_sessions()
            except Exception:
                log.exception("could not expire MQTT sessions")

    def _expire_sessions(self) -> None:
        """Delete the sessions of clients away for `session_expiry_s`, and
        (as amqtt) clean ones at once. Synchronous: amqtt's broadcast loop
        iterates the subscriptions and reconnections look sessions up."""
        now = asyncio.get_running_loop().time()
        for client_id, (session, _) in list(self._sessions.items()):
            if session.transitions.state != "disconnected":
                continue
            since: float = session.attributes.setdefault(_DISCONNECTED_AT, now)
            if not (
                session.clean_session
                or session.is_anonymous
                or now - since >= self._session_expiry_s
            ):
                continue
            del self._sessions[client_id]
            for a_filter, subscribers in list(self._subscriptions.items()):
                # By identity: amqtt's _del_all_subscriptions goes by client id.
                subscribers[:] = [(s, qos) for s, qos in subscribers if s is not session]
                if not subscribers:
                    del self._subscriptions[a_filter]
            session.clear_queues()
            session.inflight_out.clear()
            session.attributes.pop(_OUTBOX, None)
            if not session.clean_session:
                log.info("MQTT session %r expired", client_id)

    def session_state(self, client_id: str) -> SessionState | None:
        entry = self._sessions.get(client_id)
        if entry is None:
            return None
        session: Session = entry[0]
        return SessionState(
            connected=session.transitions.state == "connected",
            unacknowledged=len(session.inflight_out),
            queued=_Outbox.of(session).queued(session),
        )

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
        max_inflight: int = 1000,
        session_expiry_s: float = 3600.0,
    ) -> None:
        """`max_inflight`: QoS 1/2 deliveries per session sent and not yet
        acknowledged; `session_expiry_s`: how long a persistent session
        outlives its client's disconnection."""
        if not 1 <= max_inflight <= 0xFFFF:
            raise ValueError(f"max_inflight must be within 1..65535, not {max_inflight}")
        if session_expiry_s < 0:
            raise ValueError(f"session_expiry_s must not be negative, not {session_expiry_s}")
        self._host = host
        self._port = port
        self._authenticator = authenticator
        self._recheck_s = recheck_s
        self._max_inflight = max_inflight
        self._session_expiry_s = session_expiry_s
        self._broker: _AccessBroker | None = None

    @property
    def refused(self) -> collections.Counter[str]:
        """Refusals after CONNECT by reason (publish, subscribe, receive, will,
        inactive); refused CONNECTs are counted by the authenticator."""
        return self._broker.refused if self._broker is not None else collections.Counter()

    def session(self, client_id: str) -> SessionState | None:
        """The session the broker holds for `client_id`, if any."""
        return self._broker.session_state(client_id) if self._broker is not None else None

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
        self._broker = _AccessBroker(
            config,
            self._authenticator,
            self._recheck_s,
            self._max_inflight,
            self._session_expiry_s,
        )
        await self._broker.start()
        return f"mqtt://{self._host}:{port}"

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


def _peer_gone(error: Exception) -> bool:
    """Whether a write failed because the connection had closed (uvloop raises
    RuntimeError for a closed transport, asyncio a ConnectionError)."""
    return isinstance(error, ConnectionError) or (
        isinstance(error, RuntimeError) and "closed" in str(error)
    )
