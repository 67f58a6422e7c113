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

__all__ = ["AUTH_MODES", "DEV_CONF", "PROD_CONF", "PROD_DYNSEC_CONF", "MosquittoBroker", "find_mosquitto", "free_port",
           "port_open"]

logger = logging.getLogger(__name__)

DEV_CONF = Path(__file__).with_name("mosquitto") / "dev.conf"
PROD_CONF = DEV_CONF.with_name("prod.conf")  # accounts and ACL from passwd + acl_file
PROD_DYNSEC_CONF = DEV_CONF.with_name("prod-dynsec.conf")  # from the dynamic-security plugin
AUTH_MODES = ("auto", "dynsec", "acl_file")
# Lines the launcher owns; the TLS and auth lines only come from `secure_dir`.
_REWRITTEN = ("listener", "port", "persistence_location", "log_dest", "user",
              "cafile", "certfile", "keyfile", "tls_version", "password_file", "acl_file",
              "plugin", "plugin_opt_config_file")


def _choose_auth(d: Path, auth: str) -> Path | None:
    """The dynamic-security plugin to load for secure directory `d`, or None for the acl_file config."""
    from infra import security

    if auth not in AUTH_MODES:
        raise ValueError(f"broker auth must be one of {AUTH_MODES}, got {auth!r}")
    json_file = d / security.DYNSEC_FILE
    if auth == "acl_file":
        logger.info("secure broker: accounts and ACL from %s and %s (acl_file: SUBSCRIBE is not checked)",
                    d / "passwd", d / "acl")
        return None
    plugin = security.find_dynsec_plugin()
    missing = []
    if plugin is None:
        missing.append(f"no {security.DYNSEC_PLUGIN} in {', '.join(security.PLUGIN_DIRS)}")
    if not json_file.is_file():
        missing.append(f"no {json_file} (made by `python -m infra.security init`)")
    if missing and auth == "dynsec":
        raise BrokerError(f"cannot use the dynamic-security plugin: {'; '.join(missing)}")
    if missing:
        logger.warning("secure broker: %s; falling back to acl_file %s, which does not check SUBSCRIBE "
                       "(a device can join the edge's shared subscription, docs/security.md)",
                       "; ".join(missing), d / "acl")
        return None
    _check_broker_access(json_file)
    logger.info("secure broker: dynamic-security plugin %s with %s (subscribe and publish ACLs per account)",
                plugin, json_file)
    return plugin


def _check_broker_access(path: Path) -> None:
    """Raise BrokerError unless the user Mosquitto runs as may read and write `path`.

    Run as root, Mosquitto drops to the `mosquitto` user. The plugin refuses every client when it cannot
    read its file, and loses changes made with mosquitto_ctrl at the next restart when it cannot write it
    (both silently, apart from a log line: observed with 2.0.11).
    """
    st = path.stat()
    if os.geteuid() != 0:
        ok = os.access(path, os.R_OK | os.W_OK)
        who = "this user"
    else:
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return  # Mosquitto stays root (`user root`)
        who = "user mosquitto"
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o600 == 0o600
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & 0o060 == 0o060
        else:
            ok = st.st_mode & 0o006 == 0o006
    if not ok:
        raise BrokerError(f"{path} (mode {st.st_mode & 0o777:o}, uid {st.st_uid}) must be readable and writable by "
                          f"{who}, as the dynamic-security plugin rewrites it: chown mosquitto {path}")


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

    secure_dir: start from a production config (no anonymous clients, ACLs,
    TLS) with the files in that directory (`python -m infra.security init
    DIR`); the TLS listener is tls_host:tls_port (default: host and a free
    port), the plain listener host:port.
    auth (with secure_dir): "dynsec" = prod-dynsec.conf, accounts and ACLs
    from DIR/dynamic-security.json through Mosquitto's dynamic-security
    plugin, which also checks SUBSCRIBE; "acl_file" = prod.conf, DIR/passwd
    and DIR/acl (SUBSCRIBE unchecked, docs/security.md); "auto" = dynsec
    when the plugin is installed and DIR has its file, acl_file otherwise.
    The choice is logged and kept in `self.auth`.
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
        auth: str = "auto",
    ) -> None:
        super().__init__(port, host, workdir, prefix="edgeq-mosquitto-")
        self.base_conf = Path(base_conf)
        self.extra_conf = extra_conf
        self.tls_port: int | None = None
        self.auth: str | None = None  # "dynsec" | "acl_file" with secure_dir
        if secure_dir is not None:
            from infra.security import broker_lines

            d = Path(secure_dir).resolve()
            plugin = _choose_auth(d, auth)
            self.auth = "acl_file" if plugin is None else "dynsec"
            self.base_conf = PROD_CONF if plugin is None else PROD_DYNSEC_CONF
            self.tls_port = tls_port or free_port(tls_host or host)
            self.extra_conf = (*broker_lines(d, self.tls_port, tls_host or host, plugin), *extra_conf)

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

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start (ChildServer.start); with the dynamic-security plugin, fail if it could not load its file."""
        super().start(timeout)
        if self.auth == "dynsec":
            new = self.log_path.read_text(errors="replace")[self._log_offset:] if self.log_path.exists() else ""
            errors = [line for line in new.splitlines() if "Error loading Dynamic security plugin config" in line]
            if errors:
                self.stop()
                # Mosquitto keeps running without accounts: every client would be refused.
                raise BrokerError(f"mosquitto on {self.address} could not load its dynamic-security file: {errors[0]}")
        return self

    def _launch(self) -> subprocess.Popen:
        self._log_offset = len(self.log_path.read_text(errors="replace")) if self.log_path.exists() else 0
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
