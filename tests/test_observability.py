"""Observability: dashboard queries only exported metrics, provisioning fits together, real Prometheus scrapes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, Counter

import cloud_workers.metrics  # noqa: F401  (registers the cloud metrics in REGISTRY)
import edge_workers.metrics  # noqa: F401  (registers the edge metrics in REGISTRY)
from edge_workers.metrics_server import serve_metrics
from infra.broker import MosquittoBroker, port_open
from infra.prometheus_server import PrometheusError, PrometheusServer, target_groups
from tests.conftest import REPO

INFRA = REPO / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "edgeq.json"
COMPOSE = INFRA / "docker-compose.yml"
PROM_CONFIGS = [INFRA / "prometheus" / "prometheus.yml", INFRA / "prometheus" / "prometheus.docker.yml"]

# Series each metric type exposes, by suffix (prometheus-client exposition).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
# PromQL words that look like metric names but are not: aggregations, keywords, literals.
_NOT_METRICS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "atan2", "inf", "nan",
}


def exported_series() -> set[str]:
    """Every series name a worker process exports: edgeq's declared metrics plus the default collectors."""
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, matchers, ranges and label lists removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        name, call = m.groups()
        if not call and name not in _NOT_METRICS:
            names.add(name)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_exported_series_come_from_the_declared_metrics() -> None:
    names = exported_series()
    assert {"edgeq_frames_received_total", "edgeq_queue_depth", "edgeq_end_to_end_latency_seconds_bucket",
            "edgeq_cloud_inference_seconds_count", "edgeq_cloud_frames_total"} <= names
    assert "edgeq_queue_depth_bucket" not in names and "edgeq_frames_received" not in names


def test_metric_name_check_rejects_unknown_names() -> None:
    known = exported_series()
    good = ('histogram_quantile(0.99, sum by (le, tier) '
            '(rate(edgeq_end_to_end_latency_seconds_bucket{tier="edge"}[$__rate_interval])))')
    assert metric_names(good) == {"edgeq_end_to_end_latency_seconds_bucket"}
    ratio = ("sum by (direction) (rate(edgeq_payload_bytes_total[5m])) / ignoring(direction) group_left "
             "sum(rate(edgeq_frames_received_total[5m] offset 1m))")
    assert metric_names(ratio) == {"edgeq_payload_bytes_total", "edgeq_frames_received_total"}
    for wrong, unknown in [
        ("sum(rate(edgeq_not_a_metric_total[1m]))", "edgeq_not_a_metric_total"),
        ("edgeq_queue_depth_bucket", "edgeq_queue_depth_bucket"),  # a gauge has no buckets
        ('rate(edgeq_frames_received{job="edgeq"}[1m])', "edgeq_frames_received"),  # counter without _total
        ("sum(rate(edgeq_results_total[1m])) / sum(rate(node_cpu_seconds_total[1m]))", "node_cpu_seconds_total"),
    ]:
        assert metric_names(wrong) - known == {unknown}, wrong


def test_dashboard_panels_query_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and 36 <= dash["schemaVersion"] <= 41
    assert len(dash["panels"]) >= 10
    known = exported_series()
    used: set[str] = set()
    for panel in dash["panels"]:
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: {target['expr']!r} selects no metric"
            assert not names - known, f"panel {panel['title']!r} queries unexported {names - known}"
            used |= names
    declared = {n for n in known if n.startswith("edgeq_") and not n.endswith("_created")}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in declared}
    missing = {f for f in families if not any(re.sub(r"_(total|bucket|sum|count)$", "", u) == f for u in used)}
    assert not missing, f"edgeq metrics with no dashboard panel: {sorted(missing)}"


def _mounts(service: dict) -> dict[str, Path]:
    """Container path -> repo path of a compose service's bind mounts (short syntax, relative to infra/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (INFRA / source).resolve()
    return out


def _in_repo(mounts: dict[str, Path], container_path: str) -> Path:
    """The repo file behind `container_path`, through the longest matching mount."""
    for target in sorted(mounts, key=len, reverse=True):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return mounts[target] / os.path.relpath(container_path, target)
    raise AssertionError(f"{container_path} is not under any bind mount {sorted(mounts)}")


def test_compose_and_grafana_provisioning_reference_existing_files() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "prometheus", "grafana"}
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"

    mosq = _mounts(services["mosquitto"])
    assert _in_repo(mosq, "/mosquitto/config/mosquitto.conf") == INFRA / "mosquitto" / "docker.conf"

    prom = services["prometheus"]
    assert "host.docker.internal:host-gateway" in prom["extra_hosts"]
    flags = dict(arg.split("=", 1) for arg in prom["command"])
    assert _in_repo(_mounts(prom), flags["--config.file"]).is_file()
    prom_port = flags["--web.listen-address"].rsplit(":", 1)[1]

    grafana = services["grafana"]
    g_mounts = _mounts(grafana)
    provisioning = _in_repo(g_mounts, "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "edgeq.yml").read_text())["datasources"]
    (ds,) = [d for d in datasources if d["type"] == "prometheus"]
    assert ds["url"] == f"http://prometheus:{prom_port}"  # compose service name and Prometheus's port
    providers = yaml.safe_load((provisioning / "dashboards" / "edgeq.yml").read_text())["providers"]
    dash_dir = _in_repo(g_mounts, providers[0]["options"]["path"])
    assert dash_dir == DASHBOARD.parent and DASHBOARD.is_file()
    assert _in_repo(g_mounts, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD

    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]} | {
        t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]} == {"edgeq-prometheus"}


@pytest.mark.parametrize("config", PROM_CONFIGS, ids=lambda p: p.name)
def test_prometheus_configs_pass_promtool(config: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: `apt-get install prometheus` ships it (scripts/setup.sh test)"
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_mosquitto_conf_is_accepted_by_mosquitto() -> None:
    # The launcher rewrites listener/persistence/log lines; every other directive is checked by a real broker.
    with MosquittoBroker(base_conf=INFRA / "mosquitto" / "docker.conf") as broker:
        assert port_open(broker.host, broker.port)


def test_serve_metrics_binds_loopback_and_reports_its_port() -> None:
    registry = CollectorRegistry()
    Counter("edgeq_probe_total", "test counter", registry=registry).inc(3)
    port = serve_metrics(0, registry=registry)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert "edgeq_probe_total 3.0" in resp.read().decode()
    # 127.0.0.2 is loopback too, but not the address bound: other interfaces cannot connect either.
    assert not port_open("127.0.0.2", port)
    with pytest.raises(ValueError, match="70000"):
        serve_metrics(70000)


def test_target_groups_validate_addresses_and_labels() -> None:
    assert target_groups(["127.0.0.1:9601", ("localhost", 9701)], {"role": "edge"}) == [
        {"targets": ["127.0.0.1:9601", "localhost:9701"], "labels": {"role": "edge"}}]
    assert target_groups([]) == []
    for bad in ["127.0.0.1", "127.0.0.1:0", "http://h:1", ":9601"]:
        with pytest.raises(ValueError, match="host:port"):
            target_groups([bad])
    with pytest.raises(ValueError, match="__address__"):
        target_groups(["h:1"], {"__address__": "x"})


def test_prometheus_start_failure_shows_the_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("scrape_configs:\n  - job_name: edgeq\n    scrape_interval: often\n")
    with pytest.raises(PrometheusError, match="often"), PrometheusServer(config=bad):
        pass


# --- a real Prometheus scraping a real metrics endpoint -------------------------------------------

FRAMES, BYTES, LATENCIES = 37, 12345, 5
CHILD = f"""
import sys, threading
from edge_workers.metrics import E2E_LATENCY, FRAMES_RECEIVED, PAYLOAD_BYTES
from edge_workers.metrics_server import serve_metrics
FRAMES_RECEIVED.inc({FRAMES})
PAYLOAD_BYTES.labels(direction="device_to_edge").inc({BYTES})
for _ in range({LATENCIES}):
    E2E_LATENCY.labels(tier="edge").observe(0.003)
print(serve_metrics(0), flush=True)
done = threading.Event()  # serve until the test closes stdin, at most 60 s
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
done.wait(60)
"""


@pytest.fixture(scope="module")
def worker_port() -> Iterator[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO, env=env)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), f"metrics child printed {line!r}, exit code {child.poll()}"
        yield int(line)
    finally:
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@pytest.fixture(scope="module")
def prom(worker_port: int) -> Iterator[PrometheusServer]:
    # infra/prometheus/prometheus.yml copied to a /tmp dir, targets written to its targets/ subdir while
    # Prometheus runs in the repo root: the scrape works only if `targets/*.json` resolves against the
    # config file's directory, as docs/metrics.md and docker-compose.yml assume.
    with PrometheusServer() as server:
        server.set_targets([f"127.0.0.1:{worker_port}"], labels={"role": "edge"})
        yield server


def _value(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_exact_values_from_a_worker(prom: PrometheusServer, worker_port: int) -> None:
    # Bounded: target files are applied within ~5 s, then one 2 s scrape interval.
    result = prom.wait_for("edgeq_frames_received_total", lambda r: _value(r) == FRAMES, timeout=25)
    assert result[0]["metric"] == {"__name__": "edgeq_frames_received_total", "job": "edgeq",
                                   "instance": f"127.0.0.1:{worker_port}", "role": "edge"}
    assert _value(prom.query('edgeq_payload_bytes_total{direction="device_to_edge"}')) == BYTES
    assert _value(prom.query('edgeq_end_to_end_latency_seconds_count{tier="edge"}')) == LATENCIES
    assert _value(prom.query('edgeq_end_to_end_latency_seconds_bucket{tier="edge", le="0.005"}')) == LATENCIES
    assert _value(prom.query('edgeq_end_to_end_latency_seconds_bucket{tier="edge", le="0.002"}')) == 0
    assert _value(prom.query(f'up{{instance="127.0.0.1:{worker_port}"}}')) == 1


def test_every_dashboard_query_is_valid_promql(prom: PrometheusServer) -> None:
    # Grafana substitutes its interval variables before sending the query; do the same.
    for title, expr in dashboard_exprs():
        promql = expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "2s")
        assert "$" not in promql, f"{title}: unhandled Grafana variable in {expr!r}"
        prom.query(promql)  # raises PrometheusError with Prometheus's parse error
    with pytest.raises(PrometheusError, match="parse error"):
        prom.query("sum by (tier (edgeq_results_total)")
