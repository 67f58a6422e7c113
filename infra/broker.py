"""Starting and stopping a real Mosquitto broker on a free loopback port, as a child process."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from infra.child_server import ChildServer, free_port, port_open
from publishers.errors import BrokerError

__all__ = ["DEV_CONF", "PROD_CONF", "MosquittoBroker", "find_mosquitto", "free_port", "port_open"]

logger = logging.getLogger(__name__)

DEV_CONF = Path(__file__).with_name("mosquitto") / "dev.conf"
PROD_CONF = DEV_CONF.with_name("prod.conf")
# Lines the launcher owns; the TLS and auth file lines only come from `secure_dir`.
_REWRITTEN = ("listener", "port", "persistence_location", "log_dest", "user",
              "cafile", "certfile", "keyfile", "tls_version", "password_file", "acl_file")


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin, often off PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerError(
            "mosquitto not found: install it with `sudo apt-get install mosquitto mosquitto-clients` "
            "(scripts/setup.sh does this) or pass --broker HOST:PORT to use a running broker"
        )
    return found


class MosquittoBroker(ChildServer):
    """A Mosquitto child process with its own config, data directory and log.

    The port is chosen once and kept across restart(), so clients reconnect
    to the same address and persistent sessions resume.

        with MosquittoBroker() as broker:
            ... broker.host, broker.port ...

    secure_dir: start from prod.conf (no anonymous clients, ACL, TLS) with the
    passwd/acl/ca.pem/server.pem/server.key in that directory (`python -m
    infra.security init DIR`); the TLS listener is tls_host:tls_port (default:
    host and a free port), the plain listener host:port.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        workdir: str | Path | None = None,
        base_conf: Path = DEV_CONF,
        extra_conf: tuple[str, ...] = (),
        secure_dir: str | Path | None = None,
        tls_port: int | None = None,
        tls_host: str | None = None,
    ) -> None:
        super().__init__(port, host, workdir, prefix="edgeq-mosquitto-")
        self.base_conf = Path(base_conf)
        self.extra_conf = extra_conf
        self.tls_port: int | None = None
        if secure_dir is not None:
            from infra.security import broker_lines

            self.base_conf = PROD_CONF
            self.tls_port = tls_port or free_port(tls_host or host)
            self.extra_conf = (*broker_lines(Path(secure_dir).resolve(), self.tls_port, tls_host or host), *extra_conf)

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> Path:
        """Write the effective config: the base file with listener, data and log lines replaced."""
        lines = [
            line for line in self.base_conf.read_text().splitlines()
            if line.split(" ", 1)[0] not in _REWRITTEN
        ]
        lines += [
            f"listener {self.port} {self.host}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            *self._user_lines(),
            *self.extra_conf,
        ]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _user_lines(self) -> list[str]:
        # Run as root, Mosquitto drops to the `mosquitto` user: let it own the data dir.
        if os.geteuid() != 0:
            return []
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return ["user root"]
        os.chown(self.workdir, user.pw_uid, user.pw_gid)
        if self.log_path.exists():
            os.chown(self.log_path, user.pw_uid, user.pw_gid)
        return []

    NAME = "mosquitto"
    ERROR = BrokerError

    def _prepare(self) -> None:
        self._binary = find_mosquitto()

    def _launch(self) -> subprocess.Popen:
        return subprocess.Popen(
            [self._binary, "-c", str(self.write_config())], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def _failure_text(self) -> str:
        parts = []
        if self._proc is not None and self._proc.stderr is not None:
            try:
                self._proc.wait(timeout=1.0)  # let it finish writing why it stopped
            except subprocess.TimeoutExpired:
                pass
            if self._proc.poll() is not None:
                parts.append(self._proc.stderr.read().decode(errors="replace").strip())
        if self.log_path.exists():
            parts.append("\n".join(self.log_path.read_text(errors="replace").splitlines()[-10:]))
        return "\n".join(p for p in parts if p) or "no output (timed out)"

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for `down_s` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()
