"""Credentials and TLS options of edgeq's MQTT clients against a real Mosquitto that demands them."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from edge_workers.ingest import Subscriber
from infra import security
from infra.broker import MosquittoBroker
from publishers.config import PublishConfig
from publishers.mqtt import MqttConfig
from publishers.run import publish
from tests.conftest import DATA_DIR, collect


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/setup.sh installs it (mosquitto-clients / openssl)"
    return path


@pytest.fixture
def secured() -> MosquittoBroker:
    b = MosquittoBroker(extra_conf=("allow_anonymous false",))
    # The password file lives in the broker's own data dir, which Mosquitto can read after dropping root.
    pw = b.workdir / "passwd"
    subprocess.run([_tool("mosquitto_passwd"), "-c", "-b", str(pw), "dev0", "s3cret"], check=True, timeout=30)
    pw.chmod(0o644)
    b.extra_conf += (f"password_file {pw}",)
    with b:
        yield b


def test_credentials_from_a_file_are_used(secured: MosquittoBroker, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = MqttConfig(host=secured.host, port=secured.port, username="dev0", password_file=str(secret))
    sub = Subscriber(cfg, "auth-sub").start()
    sub.wait_subscribed()
    report = publish(cfg, PublishConfig(devices=1, count=20, rate_hz=0, data_dir=str(DATA_DIR)))
    assert report.total("acked") == 20
    assert len(collect(sub, 20, timeout=10)) == 20
    sub.stop()


def test_wrong_password_is_refused_and_reported(secured: MosquittoBroker) -> None:
    lines: list[str] = []
    cfg = MqttConfig(host=secured.host, port=secured.port, username="dev0", password="wrong")
    stop = threading.Event()
    timer = threading.Timer(2.5, stop.set)
    timer.start()
    report = publish(cfg, PublishConfig(devices=1, count=1, data_dir=str(DATA_DIR), progress_s=0.5), stop, lines.append)
    timer.cancel()
    assert report.total("acked") == 0
    assert any("refused: Bad user name or password" in line or "refused: Not authorized" in line
               for line in lines), lines


def _make_ca_and_server_cert(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (EC P-256, valid one day): infra/security.py."""
    _tool("openssl")
    security.make_ca(d, days=1)
    security.make_cert(d, "server", ["127.0.0.1"], days=1)
    for name in ("ca.pem", "server.pem", "server.key"):
        (d / name).chmod(0o644)  # readable by Mosquitto after it drops root


def test_tls_listener_accepts_tls_and_refuses_plain() -> None:
    b = MosquittoBroker()
    _make_ca_and_server_cert(b.workdir)
    b.extra_conf = tuple(f"{key} {b.workdir / name}" for key, name in
                         (("cafile", "ca.pem"), ("certfile", "server.pem"), ("keyfile", "server.key")))
    with b:
        tls = MqttConfig(host=b.host, port=b.port, tls_ca=str(b.workdir / "ca.pem"))
        report = publish(tls, PublishConfig(devices=1, count=5, rate_hz=0, data_dir=str(DATA_DIR)))
        assert report.total("acked") == 5

        plain = MqttConfig(host=b.host, port=b.port)
        stop = threading.Event()
        threading.Timer(2.0, stop.set).start()
        report = publish(plain, PublishConfig(devices=1, count=5, data_dir=str(DATA_DIR)), stop)
        assert report.total("acked") == 0  # a plain client never gets a CONNACK from the TLS port
