"""A real Prometheus server as a child process: free loopback port, file-discovered targets, HTTP queries."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from infra.child_server import ChildServer, port_open
from modelstore.files import write_text_atomic
from publishers.errors import EdgeqError

logger = logging.getLogger(__name__)

PROMETHEUS_YML = Path(__file__).with_name("prometheus") / "prometheus.yml"
TARGETS_NAME = "edgeq"  # targets/edgeq.json, matched by `targets/*.json` in prometheus.yml
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Result = dict[str, Any]  # one element of /api/v1/query's data.result: {"metric": {...}, "value": [ts, "v"]}


class PrometheusError(EdgeqError, RuntimeError):
    """Prometheus could not be started or queried, or did not reach an expected state in time."""


def find_prometheus() -> str:
    """Path of the prometheus binary (Debian: /usr/bin/prometheus from the `prometheus` package)."""
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin:/usr/local/bin")
    if not found:
        raise PrometheusError(
            "prometheus not found: install it with `sudo apt-get install prometheus` "
            "(Debian/Ubuntu package `prometheus`), or run the stack in infra/docker-compose.yml"
        )
    return found


def target_groups(targets: Iterable[str | tuple[str, int]], labels: Mapping[str, str] | None = None) -> list[dict]:
    """File-SD JSON content for `targets` ("host:port" or (host, port)) sharing `labels`."""
    addresses = []
    for target in targets:
        host, _, port = target.rpartition(":") if isinstance(target, str) else (target[0], ":", str(target[1]))
        if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"scrape target must be host:port with a port in 1..65535, got {target!r}")
        addresses.append(f"{host}:{int(port)}")
    clean_labels = {}
    for name, value in (labels or {}).items():
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"label name must match [a-zA-Z_][a-zA-Z0-9_]* without a leading __, got {name!r}")
        clean_labels[name] = str(value)
    return [{"targets": addresses, "labels": clean_labels}] if addresses else []


def write_targets_file(path: str | Path, targets: Iterable[str | tuple[str, int]],
                       labels: Mapping[str, str] | None = None) -> Path:
    """Write a file-SD targets file atomically: a temporary name not ending in .json, then a rename,
    so Prometheus never reads it half-written."""
    path = Path(path)
    groups = target_groups(targets, labels)
    return write_text_atomic(path, json.dumps(groups, indent=2))


class PrometheusServer(ChildServer):
    """A Prometheus child process with a private config copy, targets directory and TSDB.

    The config (infra/prometheus/prometheus.yml by default) is copied into
    `workdir`, so its relative `targets/*.json` pattern means `workdir/targets`,
    which set_targets() writes. Only the config file is copied: other files it
    names by relative path are not.

        with PrometheusServer() as prom:
            prom.set_targets(["127.0.0.1:9601"])
            prom.wait_for("up", lambda r: r and r[0]["value"][1] == "1", timeout=10)
    """

    NAME = "prometheus"
    ERROR = PrometheusError

    def __init__(
        self,
        config: str | Path = PROMETHEUS_YML,
        port: int | None = None,
        host: str = "127.0.0.1",
        workdir: str | Path | None = None,
        retention: str = "1h",
    ) -> None:
        super().__init__(port, host, workdir, prefix="edgeq-prometheus-")
        self.config = Path(config)
        self.retention = retention

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def targets_dir(self) -> Path:
        return self.workdir / "targets"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Start Prometheus and wait until /-/ready answers 200 (TSDB open, config loaded)."""
        return super().start(timeout)

    def _prepare(self) -> None:
        self._binary = find_prometheus()
        if not self.config.is_file():
            raise PrometheusError(f"prometheus config {self.config} does not exist")
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.config, self.config_path)

    def _launch(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [
                    self._binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--storage.tsdb.retention.time={self.retention}",
                    f"--web.listen-address={self.address}",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
            )

    def _ready(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False  # 503 while the TSDB opens, or not listening yet

    def _failure_text(self) -> str:
        return f"log tail:\n{self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"

    def set_targets(
        self,
        targets: Iterable[str | tuple[str, int]],
        labels: Mapping[str, str] | None = None,
        name: str = TARGETS_NAME,
    ) -> Path:
        """Replace targets/<name>.json atomically (temporary file, then rename); returns its path.

        targets: "host:port" strings or (host, port) pairs; labels are attached to all of them.
        """
        if not re.match(r"^[\w.-]+$", name):
            raise ValueError(f"targets file name must be [A-Za-z0-9_.-]+, got {name!r}")
        return write_targets_file(self.targets_dir / f"{name}.json", targets, labels)

    def _get(self, path: str, params: Mapping[str, str], timeout: float) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:  # 400/422/503 carry a JSON error body
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise PrometheusError(f"GET {path} {dict(params)} failed with HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, OSError) as err:
            raise PrometheusError(f"GET {url} failed: {err}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"GET {path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str, timeout: float = 5.0) -> list[Result]:
        """Instant query through /api/v1/query: a list of {"metric": {labels}, "value": [ts, "value"]}.

        A scalar or string result comes back as one element with empty labels.
        """
        data = self._get("/api/v1/query", {"query": promql}, timeout)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def active_targets(self) -> list[dict[str, Any]]:
        """Active scrape targets from /api/v1/targets (labels, health, lastError, lastScrape)."""
        return self._get("/api/v1/targets", {"state": "active"}, 5.0)["activeTargets"]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Result]], bool],
        timeout: float = 20.0,
        interval: float = 0.25,
    ) -> list[Result]:
        """Poll `promql` until predicate(result) is true; return that result.

        Raises PrometheusError after `timeout` seconds with the last result and
        the scrape targets' health, or at once if the query itself is invalid.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                targets = [
                    (t["labels"].get("instance"), t["health"], t["lastError"]) for t in self.active_targets()
                ]
                raise PrometheusError(
                    f"{promql!r} did not satisfy the predicate within {timeout:.0f}s; "
                    f"last result {result}; targets (instance, health, error): {targets}"
                )
            time.sleep(interval)
