"""Broker accounts, ACLs and TLS material for the production Mosquitto configs (infra/mosquitto/prod*.conf).

    python -m infra.security init DIR --device dev0 --device dev1 [--host broker.example.org]

writes into DIR:
    dynamic-security.json  accounts and roles for Mosquitto's dynamic-security plugin (prod-dynsec.conf):
                      subscribe and publish ACLs per account, passwords PBKDF2-SHA512 as the plugin stores them
    passwd            Mosquitto password file (PBKDF2-SHA512, the `$7$` format of mosquitto_passwd 2.0)
    acl               copy of infra/mosquitto/acl (prod.conf, for brokers without the plugin)
    ca.pem, ca.key    a throwaway CA (EC P-256); keep ca.key offline in production
    server.pem/.key   the broker's certificate, signed by that CA, for the given host names / IPs
    secrets/<user>    one generated password per account, mode 0600, for the clients' password_file
                      (edgeq-admin: the dynamic-security administrator, for add-device and mosquitto_ctrl)

    python -m infra.security add-device DIR --device dev2 [--broker 127.0.0.1:1883]

adds a device to a running broker with the plugin (as edgeq-admin, no restart) and to DIR.

Passwords are hashed in-process, so they never appear on a command line
(`mosquitto_passwd -b` would show them in `ps`) nor in a log line.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import queue
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from publishers import mqtt as mqttlib
from publishers import topics
from publishers.errors import ConfigError, EdgeqError
from publishers.wire import DEVICE_ID_RE

logger = logging.getLogger(__name__)

MOSQUITTO_DIR = Path(__file__).with_name("mosquitto")
PROD_CONF = MOSQUITTO_DIR / "prod.conf"  # acl_file: any Mosquitto 2.0
PROD_DYNSEC_CONF = MOSQUITTO_DIR / "prod-dynsec.conf"  # the dynamic-security plugin
ACL_TEMPLATE = MOSQUITTO_DIR / "acl"
SERVICE_ACCOUNTS = ("edgeq-edge", "edgeq-monitor")  # the ACL's `user` sections, the plugin's service roles
ADMIN_ACCOUNT = "edgeq-admin"  # dynamic-security only: may change accounts and roles ($CONTROL), nothing else
DYNSEC_FILE = "dynamic-security.json"
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
# Where distributions install the plugin (Debian/Ubuntu: multiarch dir of the mosquitto package).
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf",
               "/usr/lib64", "/usr/lib", "/usr/local/lib", "/usr/lib/mosquitto", "/usr/local/lib/mosquitto")
PBKDF2_ITERATIONS = 101  # mosquitto_passwd 2.0's default for $7$, and what `mosquitto_ctrl dynsec init` writes
DAYS = 365


class SecuritySetupError(EdgeqError):
    """openssl is missing or failed while making the CA or a certificate, or the broker refused an account change."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _pbkdf2(password: str, salt: bytes | None, iterations: int) -> tuple[bytes, bytes]:
    """(salt, PBKDF2-HMAC-SHA512 digest of 64 bytes): the hash both Mosquitto 2.0 password stores use."""
    salt = secrets.token_bytes(12) if salt is None else salt
    return salt, hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """One password-file hash in Mosquitto 2.0's `$7$` format: PBKDF2-HMAC-SHA512, 12-byte salt, base64."""
    salt, digest = _pbkdf2(password, salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def dynsec_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> dict:
    """A dynamic-security client's password fields: base64 PBKDF2-HMAC-SHA512 digest, base64 salt, iterations.

    The same hash as `password_hash`, split into the JSON fields `mosquitto_ctrl dynsec init` writes.
    """
    salt, digest = _pbkdf2(password, salt, iterations)
    return {"password": _b64(digest), "salt": _b64(salt), "iterations": iterations}


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


def _acl(acltype: str, topic: str) -> dict:
    return {"acltype": acltype, "topic": topic, "allow": True}


_FRAME_FILTERS = tuple(f"{topics.PREFIX}/{kind}/+" for kind in topics.FRAME_KINDS)


def device_role(device_id: str) -> dict:
    """The dynamic-security role of one device: its own frame and status topics out, its own results in.

    Literal topics, one role per device: Mosquitto 2.0.11's plugin does not substitute %u or %c in ACL
    topics (observed: `edgeq/v1/frames/%u` let device devA0 publish nothing).
    """
    d = check_username(device_id)
    sends = (*(topics.frames_of_kind(kind, d) for kind in topics.FRAME_KINDS), topics.status(f"device.{d}"))
    return {"rolename": f"edgeq-device.{d}", "acls": [
        *(_acl("publishClientSend", t) for t in sends),
        _acl("subscribeLiteral", topics.results(d)),
        _acl("publishClientReceive", topics.results(d)),
    ]}


def service_roles() -> list[dict]:
    """Roles of the edge workers, the monitoring account and the dynamic-security administrator."""
    edge = [
        # Their shared subscriptions, whatever edge.group is ($share/<group>/...), and the plain filters.
        *(_acl("subscribePattern", topics.shared(f, "+")) for f in _FRAME_FILTERS),
        *(_acl("subscribePattern", f) for f in _FRAME_FILTERS),
        *(_acl("publishClientReceive", f) for f in _FRAME_FILTERS),
        _acl("publishClientSend", topics.RESULTS_FILTER),
        _acl("publishClientSend", topics.STATUS_FILTER),
    ]
    monitor = [_acl(t, f) for f in (topics.RESULTS_FILTER, topics.STATUS_FILTER)
               for t in ("subscribePattern", "publishClientReceive")]
    control = "$CONTROL/dynamic-security/#"
    admin = [_acl(t, control) for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]
    edge_account, monitor_account = SERVICE_ACCOUNTS
    return [{"rolename": edge_account, "acls": edge}, {"rolename": monitor_account, "acls": monitor},
            {"rolename": ADMIN_ACCOUNT, "acls": admin}]


def dynsec_config(devices: Sequence[str], passwords: dict[str, str]) -> dict:
    """The plugin's JSON document: a client per device and per service account, each with its role.

    passwords: {username: password} for every device, SERVICE_ACCOUNTS and ADMIN_ACCOUNT.
    Nothing is allowed by default: a client may subscribe, publish and receive only what its role lists.
    """
    roles = [device_role(d) for d in devices]
    clients = [{"username": d, **dynsec_password(passwords[d]), "roles": [{"rolename": role["rolename"]}]}
               for d, role in zip(devices, roles, strict=True)]
    services = service_roles()
    clients += [{"username": role["rolename"], **dynsec_password(passwords[role["rolename"]]),
                 "roles": [{"rolename": role["rolename"]}]} for role in services]
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": clients, "groups": [], "roles": [*roles, *services],
    }


def write_dynsec_file(path: Path, devices: Sequence[str], passwords: dict[str, str]) -> None:
    """Write the dynamic-security plugin's config file (replaces it), mode 0600: it holds password hashes."""
    path.touch(0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(dynsec_config(devices, passwords), indent=1) + "\n")


def find_dynsec_plugin() -> Path | None:
    """Path of Mosquitto's dynamic-security plugin, or None when this host has none (then prod.conf's acl_file)."""
    for d in PLUGIN_DIRS:
        path = Path(d) / DYNSEC_PLUGIN
        if path.is_file():
            return path
    return None


CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"


def add_device(d: Path, device_id: str, broker: mqttlib.MqttConfig, password: str | None = None,
               timeout: float = 15.0) -> Path:
    """Give a new device its client and role on a running broker with the dynamic-security plugin, no restart.

    Sent as ADMIN_ACCOUNT (password from d/secrets/edgeq-admin) to `broker` (host, port, TLS settings)
    through the plugin's $CONTROL topic; then the device is added to d/passwd too (an acl_file broker
    reads it on SIGHUP) and its password written to d/secrets/<device_id>. Returns that file.
    Raises SecuritySetupError when the broker refuses or does not answer.
    """
    device = check_username(device_id)
    if device in (*SERVICE_ACCOUNTS, ADMIN_ACCOUNT):
        raise ConfigError(f"device id {device!r} is a service account name; choose another device id")
    pw = password or secrets.token_urlsafe(24)
    role = device_role(device)
    admin = dataclasses.replace(broker, username=ADMIN_ACCOUNT, password=None,
                                password_file=str(d / "secrets" / ADMIN_ACCOUNT))
    _control(admin, [{"command": "createRole", **role},
                     {"command": "createClient", "username": device, "password": pw,
                      "roles": [{"rolename": role["rolename"]}]}], timeout)
    with (d / "passwd").open("a") as f:
        f.write(f"{device}:{password_hash(pw)}\n")
    path = d / "secrets" / device
    path.touch(0o600)
    path.write_text(pw + "\n")
    logger.info("added device %s (role %s) on %s and to %s", device, role["rolename"], broker.address, d)
    return path


def _control(cfg: mqttlib.MqttConfig, commands: list[dict], timeout: float) -> list[dict]:
    """Send dynamic-security commands and return the plugin's responses; SecuritySetupError on any error."""
    tag = secrets.token_hex(8)  # the plugin echoes it: other admins' responses arrive on the same topic
    events: queue.Queue = queue.Queue()
    client = mqttlib.make_client(cfg, f"{ADMIN_ACCOUNT}-{tag}")
    client.on_connect = lambda c, u, f, rc, p: (events.put(("connect", str(rc))) if rc.is_failure
                                                else c.subscribe(f"{CONTROL_TOPIC}/response", qos=1))
    client.on_subscribe = lambda c, u, mid, rcs, p: events.put(("suback", [rc.value for rc in rcs]))
    client.on_message = lambda c, u, m: events.put(("response", m.payload))
    mqttlib.start(client, cfg)
    deadline = time.monotonic() + timeout
    try:
        kind, value = _next_event(events, deadline, cfg)
        if kind != "suback" or value[0] >= 0x80:
            raise SecuritySetupError(f"{ADMIN_ACCOUNT} on {cfg.address}: {kind} {value} (is the broker using "
                                     "the dynamic-security plugin, with this directory's accounts?)")
        client.publish(CONTROL_TOPIC, json.dumps({"commands": [{**c, "correlationData": tag} for c in commands]}),
                       qos=1)
        responses: list[dict] = []
        while len(responses) < len(commands):
            kind, value = _next_event(events, deadline, cfg)
            if kind == "response":
                responses += [r for r in json.loads(value).get("responses", []) if r.get("correlationData") == tag]
    finally:
        client.disconnect()
        client.loop_stop()
    errors = [f"{r['command']}: {r['error']}" for r in responses if r.get("error")]
    if errors:
        raise SecuritySetupError(f"the dynamic-security plugin on {cfg.address} refused {'; '.join(errors)}")
    return responses


def _next_event(events: queue.Queue, deadline: float, cfg: mqttlib.MqttConfig) -> tuple[str, object]:
    try:
        return events.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise SecuritySetupError(f"no answer from the broker at {cfg.address} in time") from None


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
    devices = list(dict.fromkeys(check_username(u) for u in devices))
    taken = sorted(set(devices) & {*SERVICE_ACCOUNTS, ADMIN_ACCOUNT})
    if taken:
        raise ConfigError(f"device ids {taken} are service account names; choose other device ids")
    d.mkdir(parents=True, exist_ok=True)
    given = passwords or {}
    chosen = {u: given.get(u) or secrets.token_urlsafe(24) for u in (*devices, *SERVICE_ACCOUNTS, ADMIN_ACCOUNT)}
    # The acl_file config has no use for the administrator: it would have no ACL lines.
    write_password_file(d / "passwd", {u: pw for u, pw in chosen.items() if u != ADMIN_ACCOUNT})
    shutil.copyfile(ACL_TEMPLATE, d / "acl")
    write_dynsec_file(d / DYNSEC_FILE, devices, chosen)
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
    _give_to_mosquitto(d, ("passwd", "server.key"), owned=(DYNSEC_FILE,))
    logger.info("wrote broker accounts %s, dynamic-security roles, ACL and certificates to %s", sorted(chosen), d)
    return files


def _give_to_mosquitto(d: Path, names: Sequence[str], owned: Sequence[str] = ()) -> None:
    """As root, let the `mosquitto` group read the private files `names` (0640 root:mosquitto) and make
    the `mosquitto` user own `owned` (0600): the dynamic-security plugin rewrites its file in place."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        for name in names:
            (d / name).chmod(0o644)  # Mosquitto runs as root (no mosquitto user): nothing to share with
        return
    os.chmod(d, 0o755)
    for name in names:
        os.chown(d / name, 0, user.pw_gid)
    for name in owned:
        os.chown(d / name, user.pw_uid, user.pw_gid)


def broker_lines(d: Path, tls_port: int, tls_host: str = "127.0.0.1", plugin: Path | None = None) -> tuple[str, ...]:
    """Config lines that point a prod config at the files in `d` and put its TLS listener on tls_host:tls_port.

    plugin: the dynamic-security plugin (prod-dynsec.conf: accounts and ACLs from d/dynamic-security.json);
    None: prod.conf's password_file and acl_file.
    """
    if plugin is not None:
        auth = (f"plugin {plugin}", f"plugin_opt_config_file {d / DYNSEC_FILE}")
    else:
        auth = (f"password_file {d / 'passwd'}", f"acl_file {d / 'acl'}")
    return (
        *auth,
        f"listener {tls_port} {tls_host}",
        f"cafile {d / 'ca.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server.key'}",
        "tls_version tlsv1.2",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.security", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write dynamic-security.json, passwd, acl, a CA and a server certificate into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--device", action="append", default=[], help="device account (= device id); repeatable")
    p.add_argument("--host", action="append", default=[],
                   help="broker host name or IP for the certificate; repeatable (default 127.0.0.1, localhost)")
    p.add_argument("--days", type=int, default=DAYS, help=f"certificate validity (default {DAYS})")
    a = sub.add_parser("add-device", help="add devices to a running broker with the dynamic-security plugin "
                                          "(as edgeq-admin) and to DIR's passwd and secrets")
    a.add_argument("dir", type=Path)
    a.add_argument("--device", action="append", required=True, help="device account (= device id); repeatable")
    a.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default the plain loopback listener)")
    a.add_argument("--tls-ca", help="CA file, for the TLS listener (e.g. DIR/ca.pem)")
    args = parser.parse_args(argv)
    try:
        if args.command == "add-device":
            host, port = mqttlib.parse_address(args.broker)
            cfg = mqttlib.MqttConfig(host=host, port=port, tls_ca=args.tls_ca)
            files = {dev: add_device(args.dir, dev, cfg) for dev in args.device}
        else:
            files = init(args.dir, args.device, tuple(args.host) or ("127.0.0.1", "localhost"), days=args.days)
    except (ConfigError, SecuritySetupError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    done = (f"added to the broker at {args.broker} and to {args.dir}/passwd" if args.command == "add-device"
            else f"wrote {args.dir}/{DYNSEC_FILE}, passwd, acl, ca.pem, server.pem, server.key")
    print(f"{done}; client passwords in:")
    for user, path in files.items():
        print(f"  {user:<16} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
