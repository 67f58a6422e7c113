"""MQTT session settings and the paho-mqtt 2.x client factory every edgeq component uses."""

from __future__ import annotations

import contextlib
import logging
import select
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
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


def _varint(buf: bytes | bytearray, i: int, end: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at buf[i:end] (1-4 bytes, 7 bits each, least significant first):
    (value, index after it), or None when it runs past `end`. Raises MalformedPacket beyond 4 bytes."""
    value, shift = 0, 0
    while i < end:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise MalformedPacket("variable byte integer longer than 4 bytes")
    return None


class DrivenLoop:
    """paho's network loop run by the caller's own thread instead of `loop_start()`'s, with buffered I/O.

    Why: in a process whose consumer thread is busy with Python code, paho's
    network thread needs the GIL for every socket call (a frame takes four
    `recv` calls), and each time it may wait up to a switch interval (5 ms)
    for it, with every publish and ack from the consumer waking it on top
    (issue 7). Driven from the consumer thread, reads happen when the consumer
    asks for input, and `publish`/`ack` write to the socket directly.

    Buffered I/O (issue 7, edge actor at saturation: paho's per-packet reads and
    PUBLISH handling were 40 % of its time): the socket is read in chunks of up to
    READ_CHUNK bytes and split into packets here. With `on_publish` set, an
    incoming QoS 0/1 PUBLISH is parsed here and handed to it as (topic, payload,
    mid, qos), without paho's message objects (with `auto_ack`, a QoS 1 one is
    acknowledged first; otherwise the caller acks it with `puback`); every other packet (CONNACK,
    SUBACK, PUBACK of our own publishes, PINGRESP, ...) goes to paho's own handler,
    so paho's session state stays paho's. Writes go through `write()` (paho's
    packets too): inside `hold_writes()` they are collected and sent with one
    `send` when it ends; bytes still unsent are sent by later polls, and are
    discarded if their connection is gone (never sent on a newer one).

    Every call to the client must come from the driving thread. Reconnects
    after a lost connection with the same exponential backoff as paho's loop
    (`reconnect_min_s` .. `reconnect_max_s`); callbacks (`on_connect`, ...) run
    inside `poll`. Uses paho 2.x internals (`_packet_handle`, `_in_packet`,
    `_sock_send`, `_loop_rc_handle`); pyproject pins paho < 3.
    """

    READ_CHUNK = 65536

    def __init__(self, client: mqtt.Client, cfg: MqttConfig,
                 on_publish: Callable[[str, bytes, int, int], None] | None = None, auto_ack: bool = True) -> None:
        self.client, self.cfg, self.on_publish, self.auto_ack = client, cfg, on_publish, auto_ack
        connect_async(client, cfg)
        self._retry_at = 0.0  # monotonic time of the next connection attempt
        self._delay = 0.0     # the last backoff; 0 once connected
        self._in = bytearray()           # bytes read, not yet handled (whole packets are handled at once)
        self._out = bytearray()          # bytes to send on `_out_sock`
        self._out_sock = None
        self._hold = 0
        self._v5 = cfg.protocol == "5"
        client._sock_send = self._sock_send  # paho writes every packet through this (instance attribute)

    # ------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Send raw MQTT bytes on the current connection (after everything written before); nothing when
        not connected."""
        sock = self.client.socket()
        if sock is None:
            return
        if sock is not self._out_sock:  # a new connection: what was left for the old one is void
            self._out.clear()
            self._out_sock = sock
        self._out += data
        if not self._hold:
            self.flush()

    def puback(self, mid: int) -> None:
        """Acknowledge the QoS 1 message `mid` (a 4-byte PUBACK, after everything written before it)."""
        self.write(bytes((0x40, 2, mid >> 8, mid & 0xFF)))

    def _sock_send(self, buf) -> int:  # paho's Client._sock_send, buffered
        self.write(buf)
        return len(buf)

    @contextlib.contextmanager
    def hold_writes(self):
        """Collect writes (publishes, acks) until the block ends, then send them with one call."""
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1
            if not self._hold:
                self.flush()

    def flush(self) -> None:
        """Send what is buffered without blocking; keep the rest for the next poll."""
        sock = self._out_sock
        if not self._out or sock is None:
            return
        if sock is not self.client.socket():
            self._out.clear()
            return
        try:
            sent = sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as err:  # the connection is gone: the next poll reads EOF and reconnects
            logger.debug("send failed: %s", err)
            self._out.clear()
            return
        del self._out[:sent]
        with self.client._msgtime_mutex:
            self.client._last_msg_out = mqtt.time_func()

    @property
    def unsent(self) -> int:
        """Bytes written but not yet accepted by the socket."""
        return len(self._out) if self._out_sock is not None and self._out_sock is self.client.socket() else 0

    # ------------------------------------------------------------ reading

    def poll(self, timeout: float, read: bool = True, room: Callable[[], bool] | None = None) -> bool:
        """Connect if due, send what is buffered, wait up to `timeout` s for input, read what arrived and
        handle its whole packets while `room()` (default: always), send keepalives. `read=False` (or no
        room) leaves input in the socket (TCP then pushes back on the broker). Returns whether it handled
        a packet."""
        client = self.client
        sock = client.socket()
        if sock is None or sock.fileno() < 0:
            sock = self._connect(timeout)
            if sock is None:
                return False
        if client.want_write():
            client.loop_write()  # paho's queue (e.g. a subscribe from a callback) -> our buffer
        self.flush()
        room = room or (lambda: True)
        handled = False
        if read and self._in and room() and self._handle(room):
            handled, timeout = True, 0.0  # buffered packets: handled; look at the socket without waiting
        # Read only with room left after the buffered packets: the buffer then holds at most one partial
        # packet, so it never grows past that packet plus one chunk.
        read = read and room()
        pending = read and hasattr(sock, "pending") and sock.pending()  # TLS: already decrypted bytes
        try:
            readable, writable, _ = select.select([sock] if read else [], [sock] if self.unsent else [],
                                                  [], 0.0 if pending else timeout)
        except (OSError, ValueError):  # the socket was closed under us: reconnect on the next call
            sock.close()
            return False
        if (readable or pending) and self._fill(sock):
            handled = self._handle(room) or handled
        if writable:
            self.flush()
        if client.socket() is not None:
            client.loop_misc()
        if client.is_connected():
            self._delay = 0.0
        return handled

    def _fill(self, sock) -> bool:
        """One `recv` into the input buffer. False on nothing read (or a lost connection, handled)."""
        try:
            data = sock.recv(self.READ_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as err:
            logger.debug("receive failed: %s", err)
            data = b""
        if not data:
            self._lost(mqtt.MQTT_ERR_CONN_LOST)
            return False
        self._in += data
        with self.client._msgtime_mutex:
            self.client._last_bytes_received = mqtt.time_func()
        return True

    def _lost(self, rc) -> None:
        self._in.clear()
        self._out.clear()
        self.client._loop_rc_handle(rc)

    def _handle(self, room: Callable[[], bool]) -> bool:
        """Handle the whole packets at the start of the input buffer while `room()`. Returns whether any was."""
        buf, pos, end, handled = self._in, 0, len(self._in), False
        try:
            while pos < end and room():
                # fixed header: command byte, remaining length
                header = _varint(buf, pos + 1, end)
                if header is None:
                    return handled
                length, i = header
                if i + length > end:
                    return handled
                command, body = buf[pos], bytes(buf[i:i + length])
                pos = i + length
                handled = True
                if command & 0xF0 == mqtt.PUBLISH and self.on_publish is not None and not command & 0x04:
                    self._publish_in(command, body)
                elif not self._paho_handle(command, body):
                    return handled
            return handled
        except MalformedPacket as err:
            logger.warning("malformed packet from the broker (%s): reconnecting", err)
            pos = 0
            self._lost(mqtt.MQTT_ERR_PROTOCOL)
            return handled
        finally:
            del buf[:pos]

    def _publish_in(self, command: int, body: bytes) -> None:
        """An incoming QoS 0/1 PUBLISH: topic, packet id (QoS 1), MQTT 5 properties (skipped), payload."""
        qos = (command >> 1) & 3
        if len(body) < 2:
            raise MalformedPacket("PUBLISH without a topic")
        j = 2 + ((body[0] << 8) | body[1])
        topic = body[2:j].decode("utf-8", "replace")
        mid = 0
        if qos:
            mid = (body[j] << 8) | body[j + 1] if j + 2 <= len(body) else -1
            j += 2
        if self._v5:
            props = _varint(body, j, len(body))
            if props is None:
                raise MalformedPacket("PUBLISH ends inside its properties length")
            n, j = props
            j += n
        if j > len(body) or mid < 0:
            raise MalformedPacket("PUBLISH shorter than its header")
        if qos and self.auto_ack:
            self.puback(mid)
        self.on_publish(topic, body[j:], mid, qos)

    def _paho_handle(self, command: int, body: bytes) -> bool:
        """One packet through paho's handler (as its `_packet_read` would). False if the connection was lost."""
        client = self.client
        client._in_packet = {"command": command, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
                             "remaining_length": len(body), "packet": bytearray(body), "to_process": 0, "pos": 0}
        try:
            rc = client._packet_handle()
        except MalformedPacket:
            rc = mqtt.MQTT_ERR_PROTOCOL
        finally:
            client._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                                 "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
        if rc > 0:
            self._lost(rc)
            return False
        return client.socket() is not None

    def _connect(self, timeout: float):  # -> the new socket or None
        now = time.monotonic()
        if now < self._retry_at:
            time.sleep(min(timeout, self._retry_at - now))
            return None
        # The next attempt waits this long unless this connection gets its CONNACK (a refused one backs off too).
        self._delay = min(max(2 * self._delay, self.cfg.reconnect_min_s), self.cfg.reconnect_max_s)
        self._retry_at = now + self._delay
        self._in.clear()
        try:
            self.client.reconnect()  # blocking TCP (and TLS) connect; the CONNACK is read by a later poll
        except OSError as err:
            logger.debug("connecting to %s failed (%s); next try in %.2fs", self.cfg.address, err, self._delay)
            return None
        return self.client.socket()
