"""The production broker configs (infra/mosquitto/prod-dynsec.conf, prod.conf + acl) against a real Mosquitto.

What Mosquitto 2.0.11 does, as these tests observe it (docs/security.md).
Both configs: anonymous and wrong-password clients get CONNACK "Not
authorized"; a publish an account may not make is dropped, acknowledged with
a plain PUBACK at MQTT 3.1.1 (the protocol cannot refuse) and with PUBACK
0x87 "Not authorized" at MQTT 5. With the dynamic-security plugin
(prod-dynsec.conf): a SUBSCRIBE the account's role does not allow is refused
in the SUBACK (0x80 at MQTT 3.1.1, 0x87 at MQTT 5), so a device cannot join
the edge workers' shared subscription and the edge loses no frame. With the
acl_file (prod.conf): a denied subscription is granted but nothing is
delivered on it, because read access is checked per message, and a device in
the edge share group makes the edge lose the frames the broker hands it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from edge_workers.ingest import Received, Subscriber
from infra import cluster, security
from infra.broker import PROD_CONF, PROD_DYNSEC_CONF, MosquittoBroker
from infra.collector import ResultCollector
from publishers import mqtt as mqttlib
from publishers import topics
from publishers.config import PublishConfig
from publishers.errors import BrokerError
from publishers.run import publish
from tests.conftest import DATA_DIR, collect, non_loopback_sockets

DEVICES = ("devA0", "devB0")  # `publish(device_prefix="devA", devices=1)` names its device devA0


class Secure:
    """A broker started from a production config, the directory of its files, and one password per account."""

    def __init__(self, broker: MosquittoBroker, directory: Path, passwords: dict[str, str]):
        self.broker, self.dir, self.passwords = broker, directory, passwords

    def cfg(self, user: str | None, tls: bool = False, **kw) -> mqttlib.MqttConfig:
        """Client settings for `user` (None: anonymous) on the plain loopback or the TLS listener."""
        b = self.broker
        settings = {"host": b.host, "port": b.tls_port if tls else b.port, "username": user,
                    "password": self.passwords.get(user) if user else None,
                    "tls_ca": str(self.dir / "ca.pem") if tls else None, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
        return mqttlib.MqttConfig(**{**settings, **kw})


ACCOUNTS = (*DEVICES, *security.SERVICE_ACCOUNTS, security.ADMIN_ACCOUNT)


def _secure(auth: str) -> Iterator[Secure]:
    if auth == "dynsec":  # scripts/setup.sh installs Debian's mosquitto, which ships the plugin
        assert security.find_dynsec_plugin() is not None, f"no {security.DYNSEC_PLUGIN} on this host"
    passwords = {u: secrets.token_urlsafe(16) for u in ACCOUNTS}
    # Under /tmp, not pytest's tmp_path: Mosquitto drops root and must reach these files.
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-mosquitto-"))
    d = workdir / "security"
    security.init(d, DEVICES, passwords=passwords, days=1)
    try:
        with MosquittoBroker(workdir=workdir, secure_dir=d, auth=auth) as broker:
            assert broker.auth == auth
            yield Secure(broker, d, passwords)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def dynsec() -> Iterator[Secure]:
    """prod-dynsec.conf: accounts and ACLs from the dynamic-security plugin."""
    yield from _secure("dynsec")


@pytest.fixture(scope="module")
def aclfile() -> Iterator[Secure]:
    """prod.conf: passwd + acl_file, for brokers without the plugin."""
    yield from _secure("acl_file")


@pytest.fixture(params=["dynsec", "aclfile"])
def secure(request: pytest.FixtureRequest) -> Secure:
    """Each production config in turn, for what both must do."""
    return request.getfixturevalue(request.param)


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
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.c.on_connect = lambda c, u, f, rc, p: rc.is_failure or self.connected.set()
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, [rc.value for rc in rcs])
        self.c.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        mqttlib.start(self.c, cfg)
        assert self.connected.wait(15), f"{cfg.username} could not connect"

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return info.rc

    def puback(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code (always 0 at MQTT 3.1.1)."""
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return self.pubacks[info.mid]

    def suback(self, topic_filter: str, timeout: float = 10.0) -> int:
        """Subscribe at QoS 1 and return the SUBACK's code: the granted QoS, or 0x80 / 0x87 when refused."""
        _, mid = self.c.subscribe(topic_filter, qos=1)
        deadline = time.monotonic() + timeout
        while mid not in self.subacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.subacks[mid][0]

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


def test_aclfile_grants_any_subscription_but_delivers_only_the_devices_own_results(aclfile: Secure) -> None:
    secure = aclfile
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


def test_aclfile_a_device_in_the_edge_share_group_reads_nothing_but_costs_frames(aclfile: Secure) -> None:
    """A known limit of Mosquitto 2.0's acl_file (docs/security.md): it never checks SUBSCRIBE.

    A device may join $share/edgeq-edge/...; the broker hands it its round-robin
    share of the frames, the per-message read check refuses delivery, and those
    frames are dropped instead of going to an edge worker. prod-dynsec.conf
    refuses that SUBSCRIBE (the test below).
    """
    secure = aclfile
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
    print(f"\nacl_file, shared-subscription intruder: edge got {len(got)} of 10 frames, intruder read {len(stolen)}")
    assert stolen == []  # the intruder reads nothing
    assert 0 < len(got) < 10  # observed 5: the intruder's turns are lost


REFUSED = {"3.1.1": 0x80, "5": 0x87}  # SUBACK "Failure" at 3.1.1; "Not authorized" at MQTT 5 (observed)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_dynsec_refuses_a_device_subscription_beyond_its_own_results(dynsec: Secure, protocol: str) -> None:
    a = Client(dynsec.cfg("devA0", protocol=protocol))
    try:
        refused = {f: a.suback(f) for f in (
            topics.shared(topics.FRAMES_FILTER),              # the edge workers' shared subscription
            topics.shared(topics.FRAMES_FILTER, "other-group"),
            topics.shared(topics.results("devA0"), "g"),      # even its own results, shared
            "#", "edgeq/v1/#", "$SYS/#",
            topics.results("devB0"), topics.RESULTS_FILTER, topics.FRAMES_FILTER, topics.frames("devA0"),
            topics.STATUS_FILTER,
        )}
        own = a.suback(topics.results("devA0"))
    finally:
        a.close()
    assert refused == dict.fromkeys(refused, REFUSED[protocol])
    assert own == 1  # granted QoS 1


def test_dynsec_device_reads_only_its_own_results(dynsec: Secure) -> None:
    a = subscribed(dynsec.cfg("devA0"), "sec-dyn-a", topics.results("devA0"))
    edge = Client(dynsec.cfg("edgeq-edge"))
    try:
        for dev in ("devB0", "devA0", "devB0", "devA0"):
            assert edge.publish(topics.results(dev), f"result for {dev}".encode()) == mqtt.MQTT_ERR_SUCCESS
        got = collect(a, 4, timeout=3)
    finally:
        edge.close()
        a.stop()
    assert payloads(got) == [(topics.results("devA0"), b"result for devA0")] * 2


def test_mqtt5_puback_refuses_a_denied_publish(secure: Secure) -> None:
    edge = subscribed(secure.cfg("edgeq-edge"), "sec-edge5", topics.shared(topics.FRAMES_FILTER))
    a = Client(secure.cfg("devA0", protocol="5"))
    try:
        denied = {t: a.puback(t, b"A as someone else") for t in (
            topics.frames("devB0"), topics.status("device.devB0"), topics.results("devA0"))}
        own = a.puback(topics.frames("devA0"), b"A's own frame")
        got = collect(edge, 2, timeout=3)
    finally:
        a.close()
        edge.stop()
    assert denied == dict.fromkeys(denied, 0x87)  # "Not authorized"
    assert own == 0
    assert payloads(got) == [(topics.frames("devA0"), b"A's own frame")]


def test_dynsec_a_device_cannot_join_the_edge_share_group_and_no_frame_is_lost(dynsec: Secure) -> None:
    """The acl_file intruder test above, under prod-dynsec.conf: the SUBSCRIBE is refused, the edge gets all."""
    n = 50
    edge = subscribed(dynsec.cfg("edgeq-edge"), "sec-dyn-edge", topics.shared(topics.FRAMES_FILTER))
    thief = Client(dynsec.cfg("devB0"))
    a = Client(dynsec.cfg("devA0"))
    try:
        thief_suback = thief.suback(topics.shared(topics.FRAMES_FILTER))
        thief_msgs: list = []
        thief.c.on_message = lambda c, u, m: thief_msgs.append(m.topic)
        for i in range(n):
            a.publish(topics.frames("devA0"), b"frame %d" % i)
        got = collect(edge, n, timeout=10)
        time.sleep(0.2)
    finally:
        a.close()
        edge.stop()
        thief.close()
    print(f"\ndynsec, shared-subscription intruder: SUBACK {thief_suback:#x}, edge got {len(got)} of {n} frames, "
          f"intruder read {len(thief_msgs)}")
    assert thief_suback == 0x80
    assert thief_msgs == []
    assert sorted(m.payload for m in got) == sorted(b"frame %d" % i for i in range(n))  # 0 lost


def test_tls_listener_works_and_refuses_plain_mqtt(secure: Secure) -> None:
    assert connack(secure.cfg("devA0", tls=True)) == "Success"
    plain_to_tls = secure.cfg("devA0")
    plain_to_tls.port = secure.broker.tls_port
    assert connack(plain_to_tls, timeout=3) == "no CONNACK"
    wrong_ca = secure.cfg("devA0", tls=True)
    wrong_ca.tls_ca = "/etc/ssl/certs/ca-certificates.crt"  # the system CAs did not sign our server cert
    assert connack(wrong_ca, timeout=3) == "no CONNACK"



def test_pipeline_over_tls_with_one_account_per_component(dynsec: Secure, local_ray, caplog) -> None:
    """Devices, an edge worker actor, a cloud worker and the collector, each with its own account, over TLS,
    with the dynamic-security plugin's subscribe and publish ACLs."""
    import ray

    secure = dynsec

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
    neither run prints the password. The launcher picks the dynamic-security plugin when it is installed."""
    import sys

    from infra.child_server import free_port, port_open

    workdir = Path(tempfile.mkdtemp(prefix="edgeq-mosquitto-"))
    workdir.chmod(0o755)  # Mosquitto, after dropping root, must reach DIR
    d = workdir / "security"
    secret = secrets.token_urlsafe(16)
    security.init(d, ["devC0"], passwords={"devC0": secret}, days=1)
    port, tls_port = free_port(), free_port()
    edgeq = [sys.executable, "-m", "infra.cli"]
    broker = subprocess.Popen([*edgeq, "--log-level", "INFO", "broker", "--secure", str(d), "--port", str(port),
                               "--tls-port", str(tls_port)],
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
    expected = "dynamic-security plugin" if security.find_dynsec_plugin() else "falling back to acl_file"
    assert f"secure broker: {expected}" in out.decode(errors="replace")


def test_launcher_falls_back_to_acl_file_without_the_plugin(monkeypatch, caplog) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-mosquitto-"))
    d = workdir / "security"
    d.mkdir()
    (d / security.DYNSEC_FILE).write_text("{}")
    monkeypatch.setattr(security, "find_dynsec_plugin", lambda: None)
    caplog.set_level(logging.INFO, logger="infra.broker")
    b = MosquittoBroker(workdir=workdir, secure_dir=d)
    try:
        conf = b.write_config().read_text().splitlines()
        assert b.auth == "acl_file" and b.base_conf == PROD_CONF
        assert f"acl_file {d.resolve() / 'acl'}" in conf and f"password_file {d.resolve() / 'passwd'}" in conf
        assert not [line for line in conf if line.startswith("plugin")]
        assert "falling back to acl_file" in caplog.text and "does not check SUBSCRIBE" in caplog.text
        with pytest.raises(BrokerError, match=security.DYNSEC_PLUGIN):
            MosquittoBroker(workdir=workdir, secure_dir=d, auth="dynsec")
    finally:
        b.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_launcher_refuses_a_dynsec_file_mosquitto_cannot_rewrite_or_read() -> None:
    assert security.find_dynsec_plugin() is not None, f"no {security.DYNSEC_PLUGIN} on this host"
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-mosquitto-"))
    d = workdir / "security"
    security.init(d, ["devA0"], days=1)
    json_file = d / security.DYNSEC_FILE
    try:
        os.chown(json_file, os.getuid(), os.getgid())  # as root: root's, not mosquitto's
        json_file.chmod(0o400)
        with pytest.raises(BrokerError, match="readable and writable"):
            MosquittoBroker(workdir=workdir, secure_dir=d)
        # Readable and writable, but not JSON: Mosquitto would run and refuse every client; the launcher stops it.
        security.init(d, ["devA0"], days=1)
        json_file.write_text('{"clients": [')
        with pytest.raises(BrokerError, match="not valid JSON"), MosquittoBroker(workdir=workdir, secure_dir=d):
            pass
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _settings(conf: Path) -> list[str]:
    auth = ("password_file", "acl_file", "plugin", "plugin_opt_config_file")
    lines = [line for line in conf.read_text().splitlines() if line and not line.startswith("#")]
    return [line for line in lines if line.split(" ", 1)[0] not in auth]


def test_prod_configs_differ_only_in_their_auth_lines() -> None:
    assert _settings(PROD_DYNSEC_CONF) == _settings(PROD_CONF)
    dyn = PROD_DYNSEC_CONF.read_text().splitlines()
    assert "plugin_opt_config_file /etc/mosquitto/edgeq/dynamic-security.json" in dyn
    assert not [line for line in dyn if line.startswith(("password_file", "acl_file"))]


def test_dynsec_password_is_the_hash_mosquitto_ctrl_writes(tmp_path: Path) -> None:
    ctrl = shutil.which("mosquitto_ctrl")
    assert ctrl is not None, "mosquitto_ctrl not installed (package mosquitto-clients, scripts/setup.sh installs it)"
    path = tmp_path / "ref.json"
    subprocess.run([ctrl, "dynsec", "init", str(path), "admin", "s3cret-pw"], check=True, capture_output=True)
    ref = json.loads(path.read_text())["clients"][0]
    import base64

    ours = security.dynsec_password("s3cret-pw", base64.b64decode(ref["salt"]), ref["iterations"])
    assert ours == {k: ref[k] for k in ("password", "salt", "iterations")}


def test_dynsec_admin_adds_a_device_on_the_running_broker(dynsec: Secure) -> None:
    """`python -m infra.security add-device`: a new device works at once, with its own ACLs, no restart; the
    plugin saved it to its file (so it can rewrite it); mosquitto_ctrl works as edgeq-admin."""
    path = security.add_device(dynsec.dir, "devC0", dynsec.cfg(None))
    pw = path.read_text().strip()
    c = Client(dynsec.cfg("devC0", password=pw))
    try:
        assert c.suback(topics.results("devC0")) == 1
        assert c.suback(topics.results("devA0")) == 0x80
        assert c.suback(topics.shared(topics.FRAMES_FILTER)) == 0x80
    finally:
        c.close()
    saved = json.loads((dynsec.dir / security.DYNSEC_FILE).read_text())
    assert {cl["username"] for cl in saved["clients"]} == {*ACCOUNTS, "devC0"}
    assert (dynsec.dir / "passwd").read_text().count("devC0:") == 1
    with pytest.raises(security.SecuritySetupError, match="createClient: Client already exists"):
        security.add_device(dynsec.dir, "devC0", dynsec.cfg(None))
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl is not None:
        # Without -P it reads the password from stdin (a prompt on a terminal): none on the command line.
        admin_pw = (dynsec.dir / "secrets" / security.ADMIN_ACCOUNT).read_text()
        done = subprocess.run([ctrl, "-u", security.ADMIN_ACCOUNT, "-h", dynsec.broker.host,
                               "-p", str(dynsec.broker.port), "dynsec", "getClient", "devC0"],
                              input=admin_pw, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0 and "edgeq-device.devC0" in done.stdout, done.stdout + done.stderr
    assert pw not in dynsec.broker.log_path.read_text(errors="replace")


def test_add_device_cli_adds_on_the_plugin_and_explains_an_acl_file_broker(dynsec: Secure, aclfile: Secure) -> None:
    import sys

    def add(secure: Secure, device: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "infra.security", "add-device", str(secure.dir),
                               "--device", device,
                               "--broker", f"{secure.broker.host}:{secure.broker.tls_port}",
                               "--tls-ca", str(secure.dir / "ca.pem")],
                              capture_output=True, text=True, timeout=60, check=False)

    ok = add(dynsec, "devD0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert connack(dynsec.cfg("devD0", password=(dynsec.dir / "secrets" / "devD0").read_text().strip())) == "Success"
    refused = add(aclfile, "devD0")  # no edgeq-admin in an acl_file broker's passwd
    assert refused.returncode == 2 and "Not authorized" in refused.stderr, refused.stdout + refused.stderr
    assert not (aclfile.dir / "secrets" / "devD0").exists()
