"""Configuration (YAML, environment, flags), the broker launcher, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra import broker as broker_mod
from infra.broker import MosquittoBroker, port_open
from infra.cli import main
from infra.config import load_config
from publishers.errors import BrokerError, ConfigError
from tests.conftest import DATA_DIR, REPO


def test_yaml_then_environment_precedence(tmp_path: Path) -> None:
    path = tmp_path / "edgeq.yaml"
    path.write_text("mqtt:\n  port: 1884\n  qos: 0\npublish:\n  devices: 8\n  noise: gaussian\n")
    cfg = load_config(path, {"EDGEQ_MQTT__PORT": "1999", "EDGEQ_PUBLISH__RATE_HZ": "12.5", "HOME": "/x"})
    assert cfg.mqtt.port == 1999 and cfg.mqtt.qos == 0
    assert cfg.publish.devices == 8 and cfg.publish.rate_hz == 12.5 and cfg.publish.noise == "gaussian"
    assert load_config(None, {}).mqtt.port == 1883


@pytest.mark.parametrize(
    "text, env, message",
    [
        ("mqtt:\n  prot: 1\n", {}, r"unknown key\(s\) \['prot'\] in config.mqtt"),
        ("brokers: {}\n", {}, r"unknown key\(s\) \['brokers'\] in config"),
        ("mqtt:\n  port: many\n", {}, "config.mqtt.port must be int, got 'many'"),
        ("mqtt:\n  qos: 2\n", {}, "mqtt.qos must be 0 or 1, got 2"),
        ("publish:\n  devices: 2.5\n", {}, "config.publish.devices must be int, got 2.5"),
        ("publish:\n  rate_hz: true\n", {}, "config.publish.rate_hz must be float, got True"),
        ("", {"EDGEQ_MQTT__PROTOCOL": "4"}, "mqtt.protocol must be '3.1.1' or '5', got '4'"),
        ("publish:\n  drop_policy: lose\n", {}, "publish.drop_policy must be one of"),
        ("- a\n- b\n", {}, "must hold a mapping of sections, got list"),
        ("mqtt: [\n", {}, "is not valid YAML"),
        ("", {"EDGEQ_PUBLISH__DEVICES": "0"}, "publish.devices must be >= 1, got 0"),
        ("", {"EDGEQ_MQTT__TLS_CERT": "c.pem"}, "tls_cert and mqtt.tls_key must be given together"),
    ],
)
def test_bad_config_names_the_key_and_value(tmp_path: Path, text: str, env: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env)


def test_password_is_never_in_repr(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    cfg = load_config(None, {"EDGEQ_MQTT__PASSWORD_FILE": str(secret), "EDGEQ_MQTT__USERNAME": "dev0"})
    assert cfg.mqtt.resolved_password() == "hunter2"
    cfg = load_config(None, {"EDGEQ_MQTT__PASSWORD": "s3cret"})
    assert "s3cret" not in repr(cfg)


def test_broker_restarts_on_the_same_port_and_stops() -> None:
    b = MosquittoBroker().start()
    port = b.port
    try:
        b.restart()
        assert b.port == port and port_open(b.host, port)
    finally:
        b.close()
    assert not port_open("127.0.0.1", port)
    assert not b.workdir.exists()


def test_missing_mosquitto_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(broker_mod.shutil, "which", lambda *a, **k: None)
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        with MosquittoBroker():
            pass


def test_broker_config_error_is_reported() -> None:
    with pytest.raises(BrokerError, match="did not start.*no_such_option"):
        with MosquittoBroker(extra_conf=("no_such_option 1",)):
            pass


def test_cli_errors_are_one_clear_line(capsys) -> None:
    assert main(["publish", "--devices", "0"]) == 2
    assert "edgeq: error: publish.devices must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--config", "/nonexistent.yaml", "publish"]) == 2
    assert "cannot read config file /nonexistent.yaml" in capsys.readouterr().err


def test_help_lists_the_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "infra.cli", "--help"], capture_output=True, text=True,
                         timeout=30).stdout
    for command in ("publish", "demo", "broker", "train"):
        assert command in out


def test_demo_prints_a_summary_with_nothing_lost(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "infra.cli", "demo", "--devices", "3", "--count", "40", "--rate", "100",
         "--noise", "salt-and-pepper", "--data-dir", str(DATA_DIR), "--edge-metrics-port", "0",
         "--cloud-metrics-port", "0", "--targets-file", str(tmp_path / "targets.json")],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "edgeq demo summary" in out
    assert "frames sent            120 (confirmed by the broker)" in out
    assert "frames answered        120 unique, 0 duplicates, lost 0" in out
    for line in ("throughput", "latency capture->result p50", "accuracy", "answered at            edge",
                 "bytes device->edge     99360 (828 per frame)", "bytes edge->cloud",
                 "cloud-only, raw frames 94080 bytes of pixels to the cloud for the same frames "
                 "(99360 as wire frames)"):
        assert line in out, line
    assert "[demo]" in proc.stderr  # progress goes to stderr
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert len(targets[0]["targets"]) == 3  # 2 edge + 1 cloud metrics endpoints


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "infra" / "edgeq.example.yaml", {})
    assert cfg.mqtt.port == 1883 and cfg.publish.devices == 4 and cfg.publish.drop_policy == "block"


def test_edgeq_broker_stops_its_mosquitto_on_sigterm() -> None:
    import signal
    import time

    from infra.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "broker", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port_open("127.0.0.1", port), "edgeq broker did not start listening"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 130
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert not port_open("127.0.0.1", port), "mosquitto outlived `edgeq broker`"
