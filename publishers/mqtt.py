"""MQTT session settings and the paho-mqtt 2.x client factory every edgeq component uses."""

from __future__ import annotations

import logging
import select
import ssl
import time
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


class DrivenLoop:
    """paho's network loop run by the caller's own thread instead of `loop_start()`'s.

    Why: in a process whose consumer thread is busy with Python code, paho's
    network thread needs the GIL for every socket call (a frame takes four
    `recv` calls), and each time it may wait up to a switch interval (5 ms)
    for it, with every publish and ack from the consumer waking it on top
    (issue 7). Driven from the consumer thread, reads happen when the consumer
    asks for input, and `publish`/`ack` write to the socket directly (paho
    does so when no loop thread runs).

    Every call to the client must come from the driving thread. Reconnects
    after a lost connection with the same exponential backoff as paho's loop
    (`reconnect_min_s` .. `reconnect_max_s`); callbacks (`on_connect`, ...) run
    inside `poll`.
    """

    def __init__(self, client: mqtt.Client, cfg: MqttConfig) -> None:
        self.client, self.cfg = client, cfg
        connect_async(client, cfg)
        self._retry_at = 0.0  # monotonic time of the next connection attempt
        self._delay = 0.0     # the last backoff; 0 once connected

    def poll(self, timeout: float, read: bool = True) -> bool:
        """Connect if due, write what is queued, wait up to `timeout` s for input and read one packet of it
        (if `read`), send keepalives. `read=False` leaves input in the socket (TCP then pushes back on
        the broker). Returns whether it read."""
        client = self.client
        sock = client.socket()
        if sock is None or sock.fileno() < 0:
            sock = self._connect(timeout)
            if sock is None:
                return False
        pending = read and hasattr(sock, "pending") and sock.pending()  # TLS: already decrypted bytes
        try:
            readable, writable, _ = select.select([sock] if read else [], [sock] if client.want_write() else [],
                                                  [], 0.0 if pending else timeout)
        except (OSError, ValueError):  # the socket was closed under us: reconnect on the next call
            sock.close()
            return False
        if readable or pending:
            self._read_packet()
        if writable and client.socket() is not None:
            client.loop_write()
        client.loop_misc()
        if client.is_connected():
            self._delay = 0.0
        return bool(readable or pending)

    def _read_packet(self) -> None:
        """Read one MQTT packet (or the part of it that has arrived).

        paho's `loop_read()` reads up to (outgoing QoS 1 messages awaiting their PUBACK + 1) packets
        per call, so a consumer publishing a result per frame could not bound what one read takes;
        this is that loop's body for a single packet (paho 2.x internals; pyproject pins paho < 3).
        """
        rc = self.client._packet_read()
        if rc > 0:  # a lost connection or a protocol error: paho closes the socket and calls on_disconnect
            self.client._loop_rc_handle(rc)

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
        return self.client.socket()
