"""A server binary run as a child process on a loopback port: shared by the Mosquitto and Prometheus launchers."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ChildServer:
    """Port, private working directory, stop/close and context management of one child server.

    Subclasses implement `start()` (which sets `self._proc`) and name themselves in `NAME`.
    `port=None` picks a free port; a subclass may move to another one if it loses a race for it.
    """

    NAME = "server"
    ERROR: type[Exception] = RuntimeError

    def __init__(self, port: int | None, host: str, workdir: str | Path | None, prefix: str) -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self._own_workdir = workdir is None
        # Under /tmp rather than a private test dir: run as root, the binaries drop to their own user.
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=prefix))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0):
        """Launch the server and wait until it is ready; on losing a race for a free port, try another."""
        if self.running:
            raise self.ERROR(f"{self.NAME} already running on {self.address}")
        self._prepare()
        for attempt in range(3):
            self._proc = self._launch()
            if self._wait_ready(timeout):
                logger.info("%s pid %d listening on %s", self.NAME, self._proc.pid, self.address)
                return self
            failure = self._failure_text()
            self.stop()
            if "address already in use" in failure.lower() and not self._fixed_port and attempt < 2:
                self.port = free_port(self.host)
                continue
            raise self.ERROR(f"{self.NAME} did not start on {self.address}: {failure}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(0.05)
        return False

    # Subclasses: what to check and write first, how to launch, when it is ready, why it failed.
    def _prepare(self) -> None:
        pass

    def _launch(self) -> subprocess.Popen:
        raise NotImplementedError

    def _ready(self) -> bool:
        return port_open(self.host, self.port)

    def _failure_text(self) -> str:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server saves its state), then SIGKILL after `timeout` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s pid %d ignored SIGTERM for %.0fs; killing it", self.NAME, proc.pid, timeout)
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Stop the server and remove the working directory it created."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
