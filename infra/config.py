"""Loading edgeq's typed configuration from a YAML file plus EDGEQ_* environment overrides.

Precedence, lowest first: dataclass defaults, the YAML file, the environment
(`EDGEQ_<SECTION>__<FIELD>`, e.g. EDGEQ_MQTT__PORT=1884), command-line flags.
Unknown sections or keys are errors that name the key and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloud_workers.config import CloudConfig, RayConfig
from edge_workers.config import EdgeConfig
from publishers.config import PublishConfig
from publishers.errors import ConfigError
from publishers.mqtt import MqttConfig

ENV_PREFIX = "EDGEQ_"


@dataclass
class DemoConfig:
    """Config section `demo`."""

    answer_timeout_s: float = 30.0  # after the devices finish, wait at most this long for the last answers
    targets_file: str = ""          # Prometheus file-SD targets to write; "" = infra/prometheus/targets/edgeq.json

    def __post_init__(self) -> None:
        if self.answer_timeout_s <= 0:
            raise ConfigError(f"demo.answer_timeout_s must be > 0, got {self.answer_timeout_s}")


@dataclass
class EdgeqConfig:
    """Every section edgeq reads; each section is owned by the package that uses it."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> EdgeqConfig:
    """Build the configuration once, at the entry point. `env` is usually os.environ."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for key, value in (env or {}).items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(f"config section {section!r} must be a mapping")
            raw[section][name] = value
    return build(EdgeqConfig, raw, "config")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, strictly: unknown keys are errors."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def override(obj: Any, **values: Any) -> Any:
    """A copy of a config dataclass with the non-None `values` applied (for CLI flags)."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be a boolean, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or (hint is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}") from err
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value
