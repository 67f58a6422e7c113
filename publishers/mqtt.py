"""MQTT session settings and the paho-mqtt 2.x client factory every edgeq component uses."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from publishers import topics
from publishers.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class MqttConfig:
    """How to reach the broker. Secrets come from a file or the environment, never a log.

    host/port: broker address. qos: 0 or 1 for frames and results.
    protocol: "3.1.1" (default) or "5". Mosquitto 2.0.11 (Debian 12) drops
        MQTT 5 sessions when it restarts, losing QoS 1 messages queued for a
        persistent subscriber; MQTT 3.1.1 persistent sessions survive.
    username/password_file: credentials; `password` may be set from the
    environment (EDGEQ_MQTT__PASSWORD) and is excluded from repr.
    tls_ca/tls_cert/tls_key: PEM files; setting tls_ca turns TLS on.
    session_expiry_s: how long the broker keeps a disconnected persistent
    session (MQTT 5 only; MQTT 3.1.1 sessions last until
    `persistent_client_expiration` in the broker config).
    reconnect_min_s/reconnect_max_s: exponential reconnect backoff bounds.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "3.1.1"
    qos: int = 1
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    session_expiry_s: int = 3600
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 30.0
    max_inflight: int = 100

    def __post_init__(self) -> None:
        if self.protocol not in ("3.1.1", "5"):
            raise ConfigError(f"mqtt.protocol must be '3.1.1' or '5', got {self.protocol!r}")
        if self.qos not in (0, 1):
            raise ConfigError(f"mqtt.qos must be 0 or 1, got {self.qos!r}")
        if not 0 < int(self.port) < 65536:
            raise ConfigError(f"mqtt.port must be in 1..65535, got {self.port!r}")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(
                f"mqtt reconnect bounds must satisfy 0 < min <= max, got {self.reconnect_min_s}, {self.reconnect_max_s}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mqtt.tls_cert and mqtt.tls_key must be given together")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as err:
                raise ConfigError(f"mqtt.password_file {self.password_file!r}: {err.strerror}") from err
        return None


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (port defaults to 1883). Raises ConfigError on a bad port."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, 1883
    try:
        return host or "127.0.0.1", int(port)
    except ValueError as err:
        raise ConfigError(f"broker address must be host:port, got {address!r}") from err


def make_client(
    cfg: MqttConfig,
    client_id: str,
    *,
    status_component: str | None = None,
    persistent: bool = False,
) -> mqtt.Client:
    """A configured, not yet connected, client; connect it with `start`.

    status_component: when given, a retained "offline" Last Will is set on
        its status topic (the caller publishes "online" after connecting).
    persistent: keep the broker-side session across disconnects and broker
        restarts, so QoS 1 messages queued for this client while it is away
        are delivered when it comes back (MQTT 3.1.1 clean_session=False; MQTT 5
        clean start on the first connect only, plus a session expiry).
    """
    if cfg.protocol == "5":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=not persistent
        )
    # paho types these as int but computes with any number; sub-second backoff matters in tests.
    client.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)  # type: ignore[arg-type]
    client.max_inflight_messages_set(cfg.max_inflight)
    client.max_queued_messages_set(0)  # edgeq bounds its own queues; paho keeps what it was handed
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.resolved_password())
    if cfg.tls_ca:
        client.tls_set(
            ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key,
            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if status_component:
        client.will_set(topics.status(status_component), topics.OFFLINE, qos=1, retain=True)
    client.user_data_set({"persistent": persistent})  # read by start(): one place decides the session kind
    return client


def start(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Connect in the background and start paho's network thread.

    Non-blocking: paho keeps retrying with backoff while the broker is down,
    so a device may boot before its broker.
    """
    connect_async(client, cfg)
    client.loop_start()


def connect_async(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Set the broker address and session options; the connection is made by whichever loop runs the client."""
    persistent = bool(client.user_data_get()["persistent"])
    if cfg.protocol == "5":
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(cfg.session_expiry_s)
        clean = mqtt.MQTT_CLEAN_START_FIRST_ONLY if persistent else True
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=clean, properties=props)
    else:
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
    logger.debug("connecting to %s (MQTT %s, persistent=%s)", cfg.address, cfg.protocol, persistent)


def _set_tcp_option(sock, name: str, value: int) -> None:
    """setsockopt(IPPROTO_TCP, socket.<name>, value) where the platform has it (TCP_CORK is Linux only)."""
    option = getattr(socket, name, None)
    if option is None or sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


class DrivenLoop:
    """paho's network loop run by the caller's own thread instead of `loop_start()`'s, through paho's
    documented external-loop API only: `socket()`, `loop_read()`, `loop_write()`, `want_write()`,
    `loop_misc()`, `reconnect()`, the `on_socket_register_write` hook, callbacks.

    Why the caller's thread (issue 7): in a process whose consumer thread is busy with
    Python code, paho's network thread needs the GIL for every socket call, and each time
    it may wait up to a switch interval (5 ms) for it, with every publish and ack from
    the consumer waking it on top. Driven from the consumer thread, reads happen when the
    consumer asks for input (`poll`), and publishes and acks are written by that thread.

    Reading: `poll` waits on `socket()` with select, then calls `loop_read` until a call
    handled no message or acknowledgement (paho 2.x reads up to max(1, own QoS>0 publishes
    not yet acknowledged) packets per call whatever `max_packets` says, so one call may
    handle several), while `room()`. Incoming PUBLISHes reach `on_message(topic, payload,
    mid, qos)`; with the client's `manual_ack_set(True)` the caller acknowledges them with
    `client.ack(mid, qos)`, otherwise paho does on arrival. `on_ack(mid)` is called for each
    of our publishes the broker acknowledged (QoS 1; QoS 0: once written).

    Writing: outside `hold_writes()` paho writes each packet when it is made. Inside it (and
    while `poll` reads, unless `hold_while_reading` is off: the acks paho makes on arrival),
    packets wait in paho's queue (the `on_socket_register_write` hook tells paho an
    external loop writes) and leave when the block ends, corked (TCP_CORK) so a batch's
    results and acks go out as one segment. The socket has TCP_NODELAY: small packets
    (acks) never wait for Nagle's algorithm.

    Every call to the client must come from the driving thread. Reconnects after a lost
    connection with the same exponential backoff as paho's loop (`reconnect_min_s` ..
    `reconnect_max_s`); callbacks (`on_connect`, ...) run inside `poll`.
    """

    MAX_READ_CALLS = 256  # loop_read calls per poll (bounded: a flood cannot keep a poll here)

    def __init__(self, client: mqtt.Client, cfg: MqttConfig,
                 on_message: Callable[[str, bytes, int, int], None] | None = None,
                 on_ack: Callable[[int], None] | None = None, hold_while_reading: bool = True) -> None:
        self.client, self.cfg, self.on_message, self.on_ack = client, cfg, on_message, on_ack
        self.hold_while_reading = hold_while_reading
        connect_async(client, cfg)
        self._retry_at = 0.0  # monotonic time of the next connection attempt
        self._delay = 0.0     # the last backoff; 0 once connected
        self._hold = 0
        self.woke = False     # the last poll's wait ended on its `wake` socket
        self.handled = 0      # messages and acknowledgements handled so far (the progress of a read)
        self._unacked: set[int] = set()  # mids of our QoS>0 publishes (through `publish`) awaiting their ack
        client.on_message = self._message
        client.on_publish = self._published

    # ------------------------------------------------------------ callbacks (inside loop_read)

    def _message(self, client, userdata, message) -> None:  # noqa: ANN001
        self.handled += 1
        if self.on_message is None:
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:  # Mosquitto refuses such topics; never raise inside paho's read
            topic = ""
        try:
            self.on_message(topic, message.payload, message.mid, message.qos)
        except Exception:  # an exception would leave paho's read in the middle of a packet
            logger.exception("message handler failed on %s", topic)

    def _published(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        self.handled += 1
        self._unacked.discard(mid)
        if self.on_ack is not None:
            self.on_ack(mid)

    # ------------------------------------------------------------ writing

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """`client.publish`, keeping count of our publishes awaiting their ack (`unacked`)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_CONN_LOST):
            self._unacked.add(info.mid)
        return info

    @property
    def unacked(self) -> int:
        """Our QoS>0 publishes (made through `publish`) the broker has not acknowledged yet."""
        return len(self._unacked)

    @contextlib.contextmanager
    def hold_writes(self):
        """Keep what is published or acked in the block in paho's queue; send it, corked, when the block ends."""
        self._hold += 1
        if self._hold == 1:
            self.client.on_socket_register_write = _queued
        try:
            yield
        finally:
            self._hold -= 1
            if not self._hold:
                self.client.on_socket_register_write = None
                self.flush()

    def flush(self) -> None:
        """Write what paho has queued, without blocking (what the socket does not take waits for a poll)."""
        client = self.client
        if not client.want_write():
            return
        sock = client.socket()
        _set_tcp_option(sock, "TCP_CORK", 1)
        try:
            client.loop_write()  # on a lost connection paho closes it (and calls on_disconnect)
        finally:
            _set_tcp_option(client.socket(), "TCP_CORK", 0)

    @property
    def unsent(self) -> bool:
        """paho holds packets the socket has not taken yet."""
        return self.client.want_write()

    # ------------------------------------------------------------ reading

    def poll(self, timeout: float, room: Callable[[], bool] | None = None, wake=None) -> bool:
        """Connect if due, send what is queued, wait up to `timeout` s for input and read it while `room()`
        (default: always; no room leaves input in the socket, and TCP then pushes back on the broker), send
        keepalives. Input on `wake` (another socket) ends the wait too, unread (`woke` tells). Returns whether it
        handled a message or an acknowledgement."""
        client = self.client
        self.woke = False
        sock = client.socket()
        if sock is None or sock.fileno() < 0:
            sock = self._connect(timeout)
            if sock is None:
                return False
        self.flush()
        read = room is None or room()
        pending = read and hasattr(sock, "pending") and sock.pending()  # TLS: already decrypted bytes
        try:
            readable, writable, _ = select.select(([sock] if read else []) + ([wake] if wake is not None else []),
                                                  [sock] if client.want_write() else [], [],
                                                  0.0 if pending else timeout)
        except (OSError, ValueError):  # the socket was closed under us: reconnect on the next call
            sock.close()
            return False
        self.woke = wake is not None and wake in readable
        if not (pending or sock in readable):
            handled = False
        elif self.hold_while_reading:
            with self.hold_writes():  # acks paho makes while reading (no manual ack) leave together after it
                handled = self._read(room)
        else:
            handled = self._read(room)
        if writable:
            self.flush()
        if client.socket() is not None:
            client.loop_misc()
        if client.is_connected():
            self._delay = 0.0
        return handled

    def _read(self, room: Callable[[], bool] | None) -> bool:
        """`loop_read` until the socket is drained (a call handled fewer messages and acks than it may read, or
        none: it holds part of a packet, or nothing), the connection is lost, or no `room()`. Returns whether
        anything was handled."""
        client, handled = self.client, False
        for _ in range(self.MAX_READ_CALLS):
            before, most = self.handled, max(1, len(self._unacked))  # paho 2.x reads at most this many here
            try:
                rc = client.loop_read(most)
            except Exception as err:  # paho's decoder raised on a malformed packet (struct.error, ...)
                logger.warning("malformed packet from the broker (%s: %s): reconnecting", type(err).__name__, err)
                client.socket().close()  # the next poll reconnects, with backoff (reconnect() resets paho's reader)
                return handled
            n = self.handled - before
            handled = handled or n > 0
            if n < most or rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                return handled  # drained, or paho closed the connection (and called on_disconnect)
            if room is not None and not room():
                return handled
        return handled

    def _connect(self, timeout: float):  # -> the new socket or None
        now = time.monotonic()
        if now < self._retry_at:
            time.sleep(min(timeout, self._retry_at - now))
            return None
        # The next attempt waits this long unless this connection gets its CONNACK (a refused one backs off too).
        self._delay = min(max(2 * self._delay, self.cfg.reconnect_min_s), self.cfg.reconnect_max_s)
        self._retry_at = now + self._delay
        try:
            self.client.reconnect()  # blocking TCP (and TLS) connect; the CONNACK is read by a later poll
        except OSError as err:
            logger.debug("connecting to %s failed (%s); next try in %.2fs", self.cfg.address, err, self._delay)
            return None
        sock = self.client.socket()
        _set_tcp_option(sock, "TCP_NODELAY", 1)
        return sock


def _queued(client, userdata, sock) -> None:  # noqa: ANN001
    """on_socket_register_write while writes are held: paho queues packets, DrivenLoop.flush writes them."""
