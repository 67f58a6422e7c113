"""The production broker config (infra/mosquitto/prod.conf + acl) against a real Mosquitto, and edgeq over it.

What Mosquitto 2.0.11 does, as these tests observe it (docs/security.md):
anonymous and wrong-password clients get CONNACK "Not authorized"; a publish
the ACL denies is still acknowledged (PUBACK) at MQTT 3.1.1 and silently
dropped; a subscription the ACL denies is granted (SUBACK QoS) but nothing is
delivered on it, because read access is checked per message.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from edge_workers.ingest import Received, Subscriber
from infra import cluster, security
from infra.broker import MosquittoBroker
from infra.collector import ResultCollector
from publishers import mqtt as mqttlib
from publishers import topics
from publishers.config import PublishConfig
from publishers.run import publish
from tests.conftest import DATA_DIR, collect, non_loopback_sockets

DEVICES = ("devA0", "devB0")  # `publish(device_prefix="devA", devices=1)` names its device devA0


class Secure:
    """A broker started from prod.conf, the directory of its files, and one password per account."""

    def __init__(self, broker: MosquittoBroker, directory: Path, passwords: dict[str, str]):
        self.broker, self.dir, self.passwords = broker, directory, passwords

    def cfg(self, user: str | None, tls: bool = False, **kw) -> mqttlib.MqttConfig:
        """Client settings for `user` (None: anonymous) on the plain loopback or the TLS listener."""
        b = self.broker
        settings = {"host": b.host, "port": b.tls_port if tls else b.port, "username": user,
                    "password": self.passwords.get(user) if user else None,
                    "tls_ca": str(self.dir / "ca.pem") if tls else None, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
        return mqttlib.MqttConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def secure() -> Secure:
    passwords = {u: secrets.token_urlsafe(16) for u in (*DEVICES, *security.SERVICE_ACCOUNTS)}
    # Under /tmp, not pytest's tmp_path: Mosquitto drops root and must reach these files.
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-mosquitto-"))
    d = workdir / "security"
    security.init(d, DEVICES, passwords=passwords, days=1)
    try:
        with MosquittoBroker(workdir=workdir, secure_dir=d) as broker:
            yield Secure(broker, d, passwords)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def connack(cfg: mqttlib.MqttConfig, timeout: float = 10.0) -> str:
    """Connect once and return the broker's CONNACK reason ("Success", "Not authorized", ...) or "no CONNACK"."""
    got: list[str] = []
    client = mqttlib.make_client(cfg, f"probe-{secrets.token_hex(4)}")
    client.reconnect_delay_set(60, 60)  # one attempt inside the timeout
    client.on_connect = lambda c, u, f, rc, p: got.append(str(rc))
    mqttlib.start(client, cfg)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    client.disconnect()
    client.loop_stop()
    return got[0] if got else "no CONNACK"


class Client:
    """A connected paho client of one account (publishes at QoS 1, waits for the broker's ack)."""

    def __init__(self, cfg: mqttlib.MqttConfig):
        self.c = mqttlib.make_client(cfg, f"t-{cfg.username}-{secrets.token_hex(3)}")
        self.connected = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: rc.is_failure or self.connected.set()
        mqttlib.start(self.c, cfg)
        assert self.connected.wait(15), f"{cfg.username} could not connect"

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return info.rc

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def subscribed(cfg: mqttlib.MqttConfig, name: str, topic_filter: str) -> Subscriber:
    sub = Subscriber(cfg, name, topic_filter).start()
    sub.wait_subscribed(15)
    return sub


def payloads(msgs: list[Received]) -> list[tuple[str, bytes]]:
    return [(m.topic, m.payload) for m in msgs]


def test_anonymous_and_wrong_password_clients_are_refused(secure: Secure) -> None:
    assert connack(secure.cfg(None)) == "Not authorized"
    assert connack(secure.cfg("devA0", password="wrong")) == "Not authorized"
    assert connack(secure.cfg("nobody", password="x")) == "Not authorized"
    assert connack(secure.cfg("devA0")) == "Success"
    assert connack(secure.cfg(None, tls=True)) == "Not authorized"  # the TLS listener too


def test_device_can_publish_only_its_own_frames(secure: Secure) -> None:
    edge = subscribed(secure.cfg("edgeq-edge"), "sec-edge", topics.shared(topics.FRAMES_FILTER))
    a = Client(secure.cfg("devA0"))
    try:
        # Denied publishes are acknowledged (MQTT 3.1.1 has no way to say no) and dropped.
        assert a.publish(topics.frames("devB0"), b"A pretending to be B") == mqtt.MQTT_ERR_SUCCESS
        assert a.publish(topics.status("device.devB0"), b"offline") == mqtt.MQTT_ERR_SUCCESS
        assert a.publish(topics.results("devA0"), b"A forging its own result") == mqtt.MQTT_ERR_SUCCESS
        assert a.publish(topics.frames("devA0"), b"A's own frame") == mqtt.MQTT_ERR_SUCCESS
        # One connection delivers in order: once A's own frame is in, the denied one would be too.
        got = collect(edge, 2, timeout=5)
        assert payloads(got) == [(topics.frames("devA0"), b"A's own frame")]
    finally:
        a.close()
        edge.stop()


def test_device_reads_only_its_own_results(secure: Secure) -> None:
    a_exact = Subscriber(secure.cfg("devA0"), "sec-a-exact", topics.results("devB0")).start()
    a_wild = subscribed(secure.cfg("devA0"), "sec-a-wild", topics.RESULTS_FILTER)
    a_exact.wait_subscribed(15)  # granted: Mosquitto 2.0.11 checks read access per message, not per SUBSCRIBE
    edge = Client(secure.cfg("edgeq-edge"))
    try:
        for dev in ("devB0", "devA0", "devB0", "devA0"):
            assert edge.publish(topics.results(dev), f"result for {dev}".encode()) == mqtt.MQTT_ERR_SUCCESS
        got = collect(a_wild, 4, timeout=5)
        assert payloads(got) == [(topics.results("devA0"), b"result for devA0")] * 2
        assert collect(a_exact, 1, timeout=1) == []
    finally:
        edge.close()
        a_exact.stop()
        a_wild.stop()


def test_a_device_in_the_edge_share_group_reads_nothing_but_costs_frames(secure: Secure) -> None:
    """A known limit of Mosquitto 2.0's acl_file (docs/security.md): it never checks SUBSCRIBE.

    A device may join $share/edgeq-edge/...; the broker hands it its round-robin
    share of the frames, the per-message read check refuses delivery, and those
    frames are dropped instead of going to an edge worker.
    """
    edge = subscribed(secure.cfg("edgeq-edge"), "sec-edge2", topics.shared(topics.FRAMES_FILTER))
    thief = subscribed(secure.cfg("devB0"), "sec-thief", topics.shared(topics.FRAMES_FILTER))
    a = Client(secure.cfg("devA0"))
    try:
        for i in range(10):
            a.publish(topics.frames("devA0"), b"frame %d" % i)
        got = collect(edge, 10, timeout=5)
        stolen = collect(thief, 1, timeout=1)
    finally:
        a.close()
        edge.stop()
        thief.stop()
    print(f"\nshared-subscription intruder: edge got {len(got)} of 10 frames, intruder read {len(stolen)}")
    assert stolen == []  # the intruder reads nothing
    assert 0 < len(got) < 10  # observed 5: the intruder's turns are lost


def test_tls_listener_works_and_refuses_plain_mqtt(secure: Secure) -> None:
    assert connack(secure.cfg("devA0", tls=True)) == "Success"
    plain_to_tls = secure.cfg("devA0")
    plain_to_tls.port = secure.broker.tls_port
    assert connack(plain_to_tls, timeout=3) == "no CONNACK"
    wrong_ca = secure.cfg("devA0", tls=True)
    wrong_ca.tls_ca = "/etc/ssl/certs/ca-certificates.crt"  # the system CAs did not sign our server cert
    assert connack(wrong_ca, timeout=3) == "no CONNACK"



def test_pipeline_over_tls_with_one_account_per_component(secure: Secure, local_ray, caplog) -> None:
    """Devices, an edge worker actor, a cloud worker and the collector, each with its own account, over TLS."""
    import ray

    caplog.set_level(logging.DEBUG)  # actors log at the driver's root level too (cluster.thread_env)
    ray_cfg = RayConfig(namespace="test-security")
    # The edge password is given as a value (EDGEQ_MQTT__PASSWORD), so it travels to the actor in the pickle.
    edge_cfg = secure.cfg("edgeq-edge", tls=True)
    cloud = cluster.start_cloud(CloudConfig(actors=1, metrics_port=0), ray_cfg)
    edge = None
    collector = ResultCollector(secure.cfg("edgeq-monitor", tls=True), "sec-collector").start()
    try:
        edge = cluster.start_edge(EdgeConfig(actors=1, metrics_port=0), edge_cfg, ray_cfg, cloud.names)
        reports = []
        for prefix in ("devA", "devB"):
            pub = PublishConfig(devices=1, count=100, rate_hz=0, device_prefix=prefix, data_dir=str(DATA_DIR))
            reports.append(publish(secure.cfg(f"{prefix}0", tls=True), pub))
        sent = sum(r.total("acked") for r in reports)
        assert sent == 200
        assert collector.wait_for(200, 90), f"{collector.answered()} of 200 answered"
        stats = ray.get(edge.handles[0].stats.remote(), timeout=30)
        # Metrics endpoints bound to loopback by default (EdgeConfig/CloudConfig.metrics_addr); checked while
        # the actors run (once stopped, their processes may be gone).
        targets = edge.metrics_targets() + cloud.metrics_targets()
        assert len(targets) == 2
        for target in targets:
            host, port = target.rsplit(":", 1)
            assert host == "127.0.0.1"
            assert listening_addresses(int(port)) == {"127.0.0.1"}, target
        # Nothing this test started (Ray's GCS, raylet and workers, the actors, Mosquitto) listens or talks
        # beyond loopback: a local Ray would otherwise use the host's routable address (infra.cluster).
        assert non_loopback_sockets() == []
    finally:
        answers = collector.stop()
        if edge is not None:
            cluster.stop_tier(edge)
        cluster.stop_tier(cloud)
    print(f"\nover TLS with passwords: {sent} frames sent, {len(answers.unique)} answered "
          f"(tiers {dict(answers.tiers)}), accuracy {answers.accuracy:.3f}, edge stats received={stats['received']}")
    assert len(answers.unique) == 200 and answers.result_count == 200
    assert {d for d, _ in answers.unique} == set(DEVICES)
    assert answers.accuracy >= 0.95, answers.accuracy  # clean test frames; observed ~0.99


    # No secret in any log: this process's records, the broker's log, every Ray log file of this session.
    session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    texts = [r.getMessage() for r in caplog.records], secure.broker.log_path.read_text(errors="replace")
    logs = [p for p in session_logs.rglob("*") if p.is_file()]
    # The actor did log at DEBUG (publishers.mqtt logs its connect there), so the check below means something.
    assert any("publishers.mqtt: connecting to" in p.read_text(errors="replace") for p in logs)
    for pw in secure.passwords.values():
        assert not any(pw in t for t in texts[0]), "a password reached a log record"
        assert pw not in texts[1], "a password reached the broker log"
        hits = [p for p in logs if pw in p.read_text(errors="replace")]
        assert hits == [], f"a password reached Ray logs: {hits}"


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on `port`, from /proc/net/tcp (state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_cli_broker_secure_and_publish_never_print_the_password(tmp_path: Path) -> None:
    """`edgeq broker --secure DIR` serves TLS with the accounts in DIR; `edgeq publish` at DEBUG, with the
    password from EDGEQ_MQTT__PASSWORD, succeeds with the right one, is refused with a wrong one, and
    neither run prints the password."""
    import os
    import subprocess
    import sys

    from infra.child_server import free_port, port_open

    workdir = Path(tempfile.mkdtemp(prefix="edgeq-mosquitto-"))
    workdir.chmod(0o755)  # Mosquitto, after dropping root, must reach DIR
    d = workdir / "security"
    secret = secrets.token_urlsafe(16)
    security.init(d, ["devC0"], passwords={"devC0": secret}, days=1)
    port, tls_port = free_port(), free_port()
    edgeq = [sys.executable, "-m", "infra.cli"]
    broker = subprocess.Popen([*edgeq, "broker", "--secure", str(d), "--port", str(port), "--tls-port", str(tls_port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", tls_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not port_open("127.0.0.1", tls_port):
            broker.terminate()
            pytest.fail(f"edgeq broker --secure did not open its TLS port: {broker.communicate(timeout=30)[0]!r}")
        base = [*edgeq, "--log-level", "DEBUG", "publish", "--broker", f"127.0.0.1:{tls_port}", "--username", "devC0",
                "--tls-ca", str(d / "ca.pem"), "--devices", "1", "--device-prefix", "devC", "--rate", "0"]
        ok = subprocess.run([*base, "--count", "20"], check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "EDGEQ_MQTT__PASSWORD": secret})
        wrong_pw = secret[::-1]
        bad = subprocess.run([*base, "--count", "1", "--duration", "3"], check=False, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "EDGEQ_MQTT__PASSWORD": wrong_pw})
    finally:
        broker.terminate()
        out, _ = broker.communicate(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "confirmed=20 " in ok.stdout, ok.stdout
    assert "Not authorized" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, out.decode(errors="replace")):
        assert secret not in text and wrong_pw not in text
    assert "DEBUG" in ok.stderr  # the runs did log at DEBUG: the check above means something
