"""Build the one frozen :class:`Config` from defaults, a file and the environment.

Layering: embedded defaults < config file (YAML or INI) < environment
variables.  Runtime settings saved through the API (provider settings,
metrics settings) are layered on top by their own modules, from the database.

Errors name the key path (``rate_limit.backend: must be one of ...``) and are
raised as :class:`~stdaemon.invalid.InvalidValue`; unknown keys become warnings.

Size: the one place every section's values are read, coerced and validated; sections with
many rules (storage, cluster) keep theirs in their own modules and register them here.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
import typing
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

from stdaemon.cluster import settings as cluster_settings
from stdaemon.config.schema import SECTIONS, Config
from stdaemon.config.storage import STORAGE_VALIDATORS, check_storage
from stdaemon.invalid import InvalidValue, check_positive
from stdaemon.outbound.tls import CABundleError, load_ca_bundle
from stdaemon.providers.settings import config_validators
from stdaemon.ratelimit.rules import parse_rules
from stdaemon.store.engines import check_config_url

METRIC_CATEGORIES = (
    "jobs",
    "http",
    "rate_limits",
    "approvals",
    "audit",
    "health",
    "circuit_breakers",
    "provider",
)

# Environment variable -> key path.  The guide's names.
ENV_KEYS: dict[str, str] = {
    "SIMPLETUNER_STATE_DIR": "server.state_dir",
    "SIMPLETUNER_PUBLIC_URL": "server.public_url",
    "SIMPLETUNER_SSL_CERT": "server.ssl_cert",
    "SIMPLETUNER_SSL_KEY": "server.ssl_key",
    "SIMPLETUNER_LISTEN": "server.listen",
    "SIMPLETUNER_TRUSTED_PROXIES": "server.trusted_proxies",
    "SIMPLETUNER_LOG_LEVEL": "logging.level",
    "SIMPLETUNER_LOG_FORMAT": "logging.format",
    "SIMPLETUNER_LOG_FILE": "logging.file",
    "RATE_LIMIT_CALLS": "rate_limit.calls",
    "RATE_LIMIT_PERIOD": "rate_limit.period",
    "RATE_LIMIT_BACKEND": "rate_limit.backend",
    "RATE_LIMIT_REDIS_URL": "rate_limit.redis_url",
    "SIMPLETUNER_SECRETS_FILE": "secrets.file",
    "VAULT_ADDR": "secrets.vault_addr",
    "SIMPLETUNER_BACKUP_DIR": "backup.dir",
    "SIMPLETUNER_METRICS_TOKEN": "metrics.bearer_token",
    "SIMPLETUNER_DATABASE_URL": "database.url",
    **cluster_settings.ENV_KEYS,
}

# Variables kept in ``Config.environ`` for modules that need environment
# defaults (outbound HTTP, AWS, Vault).  Secrets are *not* copied here: the
# secrets module reads them through its own resolution chain.
ENV_SNAPSHOT = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SIMPLETUNER_CA_BUNDLE",
    "SIMPLETUNER_SSL_VERIFY",
    "SIMPLETUNER_HTTP_TIMEOUT",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    "VAULT_ADDR",
    "VAULT_NAMESPACE",
)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENDPOINT_PREFIXES = ("tcp", "tcp6", "ssl", "unix", "systemd")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclasses.dataclass
class LoadResult:
    config: Config
    warnings: list[str]


# -- coercion ---------------------------------------------------------------


def _as_bool(path: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise InvalidValue(path, f"expected a boolean (true/false), got {value!r}")


def _as_int(path: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidValue(path, f"expected an integer, got {value!r}")
    try:
        return int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise InvalidValue(path, f"expected an integer, got {value!r}") from None


def _as_float(path: str, value: Any) -> float:
    """Numbers, or durations such as ``90s``, ``5m``, ``6h``, ``1d``."""
    if isinstance(value, bool):
        raise InvalidValue(path, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise InvalidValue(path, f"expected a number or duration (e.g. 30, 5m, 6h), got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _as_str(path: str, value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        raise InvalidValue(path, f"expected a string, got {type(value).__name__}")
    return "" if value is None else str(value)


def _as_str_tuple(path: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = [v.strip() for v in re.split(r"[,\n]", value)]
    elif isinstance(value, (list, tuple)):
        items = [_as_str(f"{path}[{i}]", v).strip() for i, v in enumerate(value)]
    else:
        raise InvalidValue(path, f"expected a list, got {type(value).__name__}")
    return tuple(item for item in items if item)


def _coerce(path: str, annotation: str, value: Any) -> Any:
    if annotation == "bool":
        return _as_bool(path, value)
    if annotation == "int":
        return _as_int(path, value)
    if annotation == "float":
        return _as_float(path, value)
    if annotation == "str":
        return _as_str(path, value)
    if annotation.startswith("tuple[str"):
        return _as_str_tuple(path, value)
    if annotation == "tuple":
        if value is None:
            return ()
        if isinstance(value, str):
            # INI: rules as ``pattern|calls|period|METHOD+METHOD`` separated by
            # newlines or ``;``.
            return tuple(_parse_rule_string(f"{path}[{i}]", item) for i, item in enumerate(
                s for s in re.split(r"[;\n]", value) if s.strip()))
        if isinstance(value, (list, tuple)):
            return tuple(_freeze(v) for v in value)
        raise InvalidValue(path, f"expected a list, got {type(value).__name__}")
    raise AssertionError(f"unhandled annotation {annotation} for {path}")


def _parse_rule_string(path: str, text: str) -> Mapping:
    parts = [p.strip() for p in text.split("|")]
    if len(parts) not in (3, 4):
        raise InvalidValue(path, "expected 'pattern|calls|period[|METHOD+METHOD]'")
    methods = tuple(m for m in parts[3].split("+") if m) if len(parts) == 4 else None
    return MappingProxyType({"pattern": parts[0], "calls": parts[1], "period": parts[2],
                             "methods": methods})


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# -- validation of individual keys ------------------------------------------


def _check_choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[str, Any], Any]:
    def check(path: str, value: str) -> str:
        normalised = value.upper() if upper else value.lower()
        if normalised not in choices:
            raise InvalidValue(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return normalised

    return check


def _check_non_negative(path: str, value: float) -> float:
    if value < 0:
        raise InvalidValue(path, f"must not be negative, got {value!r}")
    return value


def _check_cidrs(path: str, value: tuple[str, ...]) -> tuple[str, ...]:
    for i, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise InvalidValue(f"{path}[{i}]", f"not an IP address or CIDR: {item!r}") from None
    return value


def _check_listen(path: str, value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise InvalidValue(path, "at least one listener is required")
    for i, item in enumerate(value):
        prefix = item.split(":", 1)[0]
        if prefix not in _ENDPOINT_PREFIXES or ":" not in item:
            raise InvalidValue(
                f"{path}[{i}]",
                f"not a Twisted endpoint string ({', '.join(_ENDPOINT_PREFIXES)}): {item!r}",
            )
    return value


def _check_url(path: str, value: str) -> str:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise InvalidValue(path, f"must be an http(s) URL such as https://host:port, got {value!r}")
    return value.rstrip("/")


def _check_categories(path: str, value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        if item not in METRIC_CATEGORIES:
            raise InvalidValue(path, f"unknown category {item!r} (known: {', '.join(METRIC_CATEGORIES)})")
    return value


def _check_redis_url(path: str, value: str) -> str:
    if not re.match(r"^(redis|rediss|unix)://", value):
        raise InvalidValue(path, f"must be a redis:// URL, got {value!r}")
    return value


def _check_rules(path: str, value: tuple) -> tuple:
    checked = []
    for i, rule in enumerate(value):
        rpath = f"{path}[{i}]"
        if isinstance(rule, (list, tuple)) and len(rule) in (3, 4):
            rule = {"pattern": rule[0], "calls": rule[1], "period": rule[2],
                    "methods": rule[3] if len(rule) == 4 else None}
        if not isinstance(rule, Mapping):
            raise InvalidValue(rpath, "a rule is {pattern, calls, period, methods}")
        unknown = set(rule) - {"pattern", "calls", "period", "methods"}
        if unknown:
            raise InvalidValue(f"{rpath}.{sorted(unknown)[0]}", "unknown rule key")
        pattern = _as_str(f"{rpath}.pattern", rule.get("pattern"))
        try:
            re.compile(pattern)
        except re.error as e:
            raise InvalidValue(f"{rpath}.pattern", f"invalid regular expression: {e}") from None
        if not pattern:
            raise InvalidValue(f"{rpath}.pattern", "required")
        calls = _check_non_negative(f"{rpath}.calls", _as_int(f"{rpath}.calls", rule.get("calls")))
        period = check_positive(f"{rpath}.period", _as_int(f"{rpath}.period", rule.get("period")))
        methods = rule.get("methods")
        if methods is not None:
            methods = tuple(m.upper() for m in _as_str_tuple(f"{rpath}.methods", methods))
        checked.append(MappingProxyType(
            {"pattern": pattern, "calls": calls, "period": period, "methods": methods}))
    # The rate limiter's own parser has the remaining limits (bounds on calls
    # and period, method names): run it now so --check-config sees them too.
    parse_rules([dict(rule) for rule in checked], path)
    return tuple(checked)


VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "server.listen": _check_listen,
    "server.public_url": _check_url,
    "server.trusted_proxies": _check_cidrs,
    "server.max_body_bytes": check_positive,
    "server.shutdown_timeout": check_positive,
    "server.health_cache_seconds": _check_non_negative,
    "logging.level": _check_choice(_LOG_LEVELS, upper=True),
    "logging.format": _check_choice(("json", "text")),
    "rate_limit.calls": _check_non_negative,
    "rate_limit.period": check_positive,
    "rate_limit.backend": _check_choice(("memory", "sqlite", "redis")),
    "rate_limit.redis_url": _check_redis_url,
    "rate_limit.timeout": check_positive,
    "rate_limit.rules": _check_rules,
    "secrets.vault_addr": _check_url,
    "secrets.cache_ttl": _check_non_negative,
    "backup.interval": check_positive,
    "backup.keep_days": _check_non_negative,
    "backup.keep_count": _check_non_negative,
    "metrics.prometheus_categories": _check_categories,
    "auth.session_ttl": check_positive,
    "jobs.poll_interval": check_positive,
    "jobs.upload_credential_ttl": check_positive,
    "jobs.max_submit_bytes": check_positive,
    "audit.retention_days": _check_non_negative,
    "database.url": check_config_url,
    "database.pool_size": check_positive,
    **STORAGE_VALIDATORS,
    **cluster_settings.VALIDATORS,
}

# Validators for ``providers.<name>.<field>``, from the provider settings
# module: ``PROVIDER_VALIDATORS[field](path, value)`` returns the normalised
# value or raises InvalidValue naming the key path.
PROVIDER_VALIDATORS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType(config_validators())


# -- reading files ----------------------------------------------------------


def read_file(path: str) -> dict[str, Any]:
    """Parse a YAML or INI file into nested dicts (INI values stay strings)."""
    lowered = path.lower()
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as e:
        raise InvalidValue("--config", f"cannot read {path}: {e.strerror}") from None
    if lowered.endswith((".yaml", ".yml")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidValue("--config", f"{path} is not valid YAML: {e}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise InvalidValue("--config", f"{path}: the top level must be a mapping")
        return data
    if lowered.endswith((".ini", ".cfg")):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=path)
        except configparser.Error as e:
            raise InvalidValue("--config", f"{path} is not valid INI: {e}") from None
        data: dict[str, Any] = {}
        for section in parser.sections():
            values = dict(parser.items(section))
            if section.startswith("provider:") or section.startswith("providers."):
                name = section.split(":", 1)[1] if ":" in section else section.split(".", 1)[1]
                data.setdefault("providers", {})[name.strip()] = values
            else:
                data[section] = values
        return data
    raise InvalidValue("--config", f"{path}: unknown file type (use .yaml, .yml, .ini or .cfg)")


# -- building ---------------------------------------------------------------


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadResult:
    """Build the frozen config.

    ``overrides`` maps key paths to values from the command line (e.g.
    ``{"server.listen": [...]}``); they win over everything.
    """
    environ = dict(os.environ if environ is None else environ)
    warnings: list[str] = []
    raw_file = read_file(path) if path else {}

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    sources: dict[str, str] = {}

    for section, body in raw_file.items():
        if section == "providers":
            continue
        if section not in SECTIONS:
            warnings.append(f"unknown configuration section {section!r} (ignored)")
            continue
        if not isinstance(body, dict):
            raise InvalidValue(section, "must be a mapping of keys")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key, value in body.items():
            if key not in known:
                warnings.append(f"unknown configuration key {section}.{key} (ignored)")
                continue
            values[section][key] = value
            sources[f"{section}.{key}"] = "file"

    for var, keypath in ENV_KEYS.items():
        if var in environ and environ[var] != "":
            section, key = keypath.split(".", 1)
            values[section][key] = environ[var]
            sources[keypath] = "env"

    for keypath, value in (overrides or {}).items():
        section, key = keypath.split(".", 1)
        values[section][key] = value
        sources[keypath] = "cli"

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values[section]:
                continue
            keypath = f"{section}.{f.name}"
            annotation = _annotation_name(hints[f.name])
            value = _coerce(keypath, annotation, values[section][f.name])
            validator = VALIDATORS.get(keypath)
            if validator is not None:
                value = validator(keypath, value)
            kwargs[f.name] = value
        built[section] = cls(**kwargs)

    server = built["server"]
    if bool(server.ssl_cert) != bool(server.ssl_key):
        raise InvalidValue("server.ssl_key" if server.ssl_cert else "server.ssl_cert",
                          "ssl_cert and ssl_key must be set together")
    built["storage"] = check_storage(built["storage"])
    cluster_settings.check_section(built["cluster"])
    backend = built["rate_limit"].backend
    if backend == "redis" and "rate_limit.redis_url" not in sources and "REDIS_URL" in environ:
        built["rate_limit"] = dataclasses.replace(
            built["rate_limit"], redis_url=_check_redis_url("REDIS_URL", environ["REDIS_URL"]))

    providers = {}
    raw_providers = raw_file.get("providers") or {}
    if not isinstance(raw_providers, dict):
        raise InvalidValue("providers", "must be a mapping of provider name to settings")
    for name, body in raw_providers.items():
        if not isinstance(body, dict):
            raise InvalidValue(f"providers.{name}", "must be a mapping of settings")
        checked = {}
        for key, value in body.items():
            keypath = f"providers.{name}.{key}"
            if value is None:          # ``key:`` with no value = not set here
                continue
            validator = PROVIDER_VALIDATORS.get(key)
            if validator is None:
                warnings.append(f"unknown configuration key {keypath} (ignored)")
                continue
            checked[key] = validator(keypath, value)
            sources[keypath] = "file"
        if checked.get("ssl_ca_bundle"):
            # A CA bundle that cannot be used would only fail at the first
            # provider call: refuse it at start-up instead.
            try:
                load_ca_bundle(os.path.expanduser(checked["ssl_ca_bundle"]))
            except CABundleError as e:
                raise InvalidValue(f"providers.{name}.ssl_ca_bundle", str(e)) from None
        providers[name] = MappingProxyType(checked)

    snapshot = {k: environ[k] for k in ENV_SNAPSHOT if k in environ}
    config = Config(
        **built,
        providers=MappingProxyType(providers),
        sources=MappingProxyType(sources),
        environ=MappingProxyType(snapshot),
        config_file=path or "",
    )
    return LoadResult(config=config, warnings=warnings)


def _annotation_name(hint: Any) -> str:
    if hint in (bool, int, float, str):
        return hint.__name__
    if hint is tuple:
        return "tuple"
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "tuple[str, ...]"
    return str(hint)


def state_path(config: Config, *parts: str) -> str:
    """A path under the state directory, with ``~`` expanded."""
    return os.path.join(os.path.expanduser(config.server.state_dir), *parts)


def database_path(config: Config) -> str:
    return state_path(config, "config", "cloud", "jobs.db")
