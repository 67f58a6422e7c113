"""Broker accounts, ACL and TLS material for the production Mosquitto config (infra/mosquitto/prod.conf).

    python -m infra.security init DIR --device dev0 --device dev1 [--host broker.example.org]

writes into DIR:
    passwd            Mosquitto password file (PBKDF2-SHA512, the `$7$` format of mosquitto_passwd 2.0)
    acl               copy of infra/mosquitto/acl
    ca.pem, ca.key    a throwaway CA (EC P-256); keep ca.key offline in production
    server.pem/.key   the broker's certificate, signed by that CA, for the given host names / IPs
    secrets/<user>    one generated password per account, mode 0600, for the clients' password_file

Passwords are hashed in-process, so they never appear on a command line
(`mosquitto_passwd -b` would show them in `ps`) nor in a log line.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from publishers.errors import ConfigError, EdgeqError
from publishers.wire import DEVICE_ID_RE

logger = logging.getLogger(__name__)

MOSQUITTO_DIR = Path(__file__).with_name("mosquitto")
PROD_CONF = MOSQUITTO_DIR / "prod.conf"
ACL_TEMPLATE = MOSQUITTO_DIR / "acl"
SERVICE_ACCOUNTS = ("edgeq-edge", "edgeq-monitor")  # the ACL's `user` sections
PBKDF2_ITERATIONS = 101  # mosquitto_passwd 2.0's default for $7$
DAYS = 365


class SecuritySetupError(EdgeqError):
    """openssl is missing or failed while making the CA or a certificate."""


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """One password-file hash in Mosquitto 2.0's `$7$` format: PBKDF2-HMAC-SHA512, 12-byte salt, base64."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    b64 = lambda b: base64.b64encode(b).decode()
    return f"$7${iterations}${b64(salt)}${b64(digest)}"


def check_username(name: str) -> str:
    """Usernames are device ids or service accounts: [A-Za-z0-9_.-]{1,64}, so ACL patterns substitute them."""
    if not DEVICE_ID_RE.fullmatch(name):
        raise ConfigError(f"account name must match {DEVICE_ID_RE.pattern}, got {name!r}")
    return name


def write_password_file(path: Path, accounts: dict[str, str]) -> None:
    """Write a Mosquitto password file for {username: password} (replaces the file)."""
    lines = [f"{check_username(user)}:{password_hash(pw)}" for user, pw in accounts.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o640)


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise SecuritySetupError("openssl not found: install it (scripts/setup.sh does: apt-get install openssl)")
    done = subprocess.run([exe, *args], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise SecuritySetupError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(d: Path, days: int = DAYS, name: str = "edgeq-ca") -> Path:
    """A self-signed CA (EC P-256) as d/ca.pem + d/ca.key. Returns the certificate path."""
    _openssl("req", "-x509", *_EC, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", str(days),
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "ca.key").chmod(0o600)
    return d / "ca.pem"


def make_cert(d: Path, name: str, hosts: Sequence[str], days: int = DAYS) -> Path:
    """d/<name>.pem + d/<name>.key signed by d/ca.pem, valid for `hosts` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    csr = d / f"{name}.csr"
    _openssl("req", *_EC, "-keyout", str(d / f"{name}.key"), "-out", str(csr), "-subj", f"/CN={hosts[0]}")
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", str(days), "-extfile", str(ext))
    csr.unlink()
    ext.unlink()
    return d / f"{name}.pem"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def init(d: Path, devices: Iterable[str], hosts: Sequence[str] = ("127.0.0.1", "localhost"),
         passwords: dict[str, str] | None = None, days: int = DAYS) -> dict[str, Path]:
    """Make everything prod.conf needs in `d` (see the module docstring).

    passwords: fixed passwords for some accounts (tests); the others are generated.
    Returns {username: path of its password file}.
    """
    d.mkdir(parents=True, exist_ok=True)
    accounts = {check_username(u): None for u in (*devices, *SERVICE_ACCOUNTS)}
    given = passwords or {}
    chosen = {u: given.get(u) or secrets.token_urlsafe(24) for u in accounts}
    write_password_file(d / "passwd", chosen)
    shutil.copyfile(ACL_TEMPLATE, d / "acl")
    make_ca(d, days)
    make_cert(d, "server", hosts, days)
    secret_dir = d / "secrets"
    secret_dir.mkdir(exist_ok=True)
    secret_dir.chmod(0o700)
    files = {}
    for user, pw in chosen.items():
        path = secret_dir / user
        path.touch(0o600)
        path.write_text(pw + "\n")
        files[user] = path
    # Mosquitto drops root to its own user and must read these (never the CA key or the secrets).
    for name in ("passwd", "acl", "ca.pem", "server.pem", "server.key"):
        (d / name).chmod(0o644 if name.endswith(".pem") or name == "acl" else 0o640)
    _give_to_mosquitto(d, ("passwd", "server.key"))
    logger.info("wrote broker accounts %s, ACL and certificates to %s", sorted(chosen), d)
    return files


def _give_to_mosquitto(d: Path, names: Sequence[str]) -> None:
    """As root, let the `mosquitto` group read the private files (0640 root:mosquitto)."""
    if os.geteuid() != 0:
        return
    import grp

    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        for name in names:
            (d / name).chmod(0o644)  # Mosquitto runs as root (no mosquitto user): nothing to share with
        return
    os.chmod(d, 0o755)
    for name in names:
        os.chown(d / name, 0, gid)


def broker_lines(d: Path, tls_port: int, tls_host: str = "127.0.0.1") -> tuple[str, ...]:
    """Config lines that point prod.conf at the files in `d` and put its TLS listener on tls_host:tls_port."""
    return (
        f"listener {tls_port} {tls_host}",
        f"cafile {d / 'ca.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server.key'}",
        "tls_version tlsv1.2",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.security", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write passwd, acl, a CA and a server certificate into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--device", action="append", default=[], help="device account (= device id); repeatable")
    p.add_argument("--host", action="append", default=[],
                   help="broker host name or IP for the certificate; repeatable (default 127.0.0.1, localhost)")
    p.add_argument("--days", type=int, default=DAYS, help=f"certificate validity (default {DAYS})")
    args = parser.parse_args(argv)
    try:
        files = init(args.dir, args.device, tuple(args.host) or ("127.0.0.1", "localhost"), days=args.days)
    except (ConfigError, SecuritySetupError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.dir}/passwd, acl, ca.pem, server.pem, server.key; client passwords in:")
    for user, path in files.items():
        print(f"  {user:<16} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
