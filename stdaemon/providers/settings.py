"""Provider settings (S5): the fields, their validation, and effective values.

Pure: no I/O.  Checking that a CA bundle file exists and holds PEM
certificates is I/O and is done by the caller (``stdaemon.providers.service``)
off the reactor; here the path's shape is checked.

Layering per field: ``default`` < ``file`` (``providers.<name>.<field>``) <
``env`` (the environment defaults of S3) < ``api`` (saved through
``PUT /api/cloud/providers/{p}``).  :func:`effective` returns every field's
value and where it came from.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from stdaemon.jobs import costs
from stdaemon.providers import model_versions as mv
from stdaemon.invalid import InvalidValue

PROVIDERS = ("replicate",)

SOURCES = ("default", "file", "env", "api")


# -- validators (value -> normalised value, or raise ValueError(reason)) ------

def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("must be true or false")


def _number(minimum: float | None = None, maximum: float | None = None, strict_min: bool = False,
            integer: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError("must be a number") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("must be a number")
        if integer:
            if float(value) != int(value):
                raise ValueError("must be a whole number")
            value = int(value)
        if minimum is not None:
            if strict_min and value <= minimum:
                raise ValueError(f"must be greater than {minimum:g}")
            if not strict_min and value < minimum:
                raise ValueError(f"must be at least {minimum:g}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum:g}")
        return value if integer else float(value)
    return check


def _cidr_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [part for chunk in value.splitlines() for part in chunk.split(",")]
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of CIDR ranges or IP addresses")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError("must be a list of CIDR ranges or IP addresses")
        item = item.strip()
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a valid CIDR range or IP address") from None
        out.append(str(network))
    return out


def _str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return [v.strip() for v in value if v.strip()]


def _http_url(what: str, allow_empty: bool = True, allow_path: bool = True) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"must be a {what} string")
        value = value.strip()
        if not value:
            if allow_empty:
                return ""
            raise ValueError(f"must be a {what}")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"must be a {what} starting with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"must be a {what} with a host")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"has an invalid port") from None
        if not allow_path and parts.path not in ("", "/"):
            raise ValueError(f"must be a {what} without a path")
        return value.rstrip("/") if allow_path else value
    return check


def _path(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("must be a file path")
    value = value.strip()
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value.strip().lower()
    return check


def _pairs(value: str) -> dict[str, str]:
    """``"a=1, b=2"`` (the INI form of a mapping) → ``{"a": "1", "b": "2"}``."""
    out = {}
    for item in value.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep:
            key, sep, val = item.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not a name=value pair")
        out[key.strip()] = val.strip()
    return out


def _mapping(value: Any, what: str, item: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A mapping (or its INI form ``"a=1, b=2"``) whose entries ``item(key, value)`` checks
    and normalises; ``what`` completes "must be a mapping of …"."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = _pairs(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of {what}")
    return {key: item(key, entry) for key, entry in value.items()}


def _version_entry(key: str, version: Any) -> str:
    if key not in costs.HARDWARE_PROFILES and key != "default":
        raise ValueError(f"{key!r} is not a hardware profile "
                         f"({', '.join(costs.HARDWARE_PROFILES)} or default)")
    if not isinstance(version, str) or not version.strip():
        raise ValueError(f"version for {key} must be a non-empty string")
    return version.strip()


def _model_entry(key: str, model: Any) -> str:
    if key not in costs.HARDWARE_PROFILES:
        raise ValueError(f"{key!r} is not a hardware profile ({', '.join(costs.HARDWARE_PROFILES)})")
    try:
        mv.parse_model_id(model)
    except ValueError as exc:
        raise ValueError(f"model for {key} {exc}") from None
    return model.strip()


def _price_entry(key: str, price: Any) -> float:
    if key not in set(costs.HARDWARE_PROFILES) | set(costs.DEFAULT_GPU_PRICES):
        raise ValueError(f"{key!r} is not a GPU type or hardware profile")
    return _number(0.0)(price)


def _versions(value: Any) -> dict[str, str]:
    return _mapping(value, "hardware profile to Replicate model version", _version_entry)


def _models(value: Any) -> dict[str, str]:
    return _mapping(value, "hardware profile to Replicate model owner/name", _model_entry)


def _version(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    return mv.check_version(value)


def _prices(value: Any) -> dict[str, float]:
    return _mapping(value, "GPU type or hardware profile to USD per GPU-second", _price_entry)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    secret: bool = False


FIELDS: dict[str, FieldSpec] = {spec.name: spec for spec in (
    FieldSpec("webhook_allowed_ips", [], _cidr_list,
              "CIDR ranges / IPs allowed to call the webhook; empty = all"),
    FieldSpec("webhook_require_signature", True, _bool, "Require a valid webhook signature"),
    FieldSpec("ssl_verify", True, _bool, "Verify TLS certificates of provider calls"),
    FieldSpec("ssl_ca_bundle", "", _path, "PEM file with the CA certificate(s) to trust"),
    FieldSpec("proxy_url", "", _http_url("proxy URL", allow_path=False), "HTTP proxy for provider calls",
              secret=True),
    FieldSpec("no_proxy", [], _str_list, "Hosts reached without the proxy"),
    FieldSpec("http_timeout", 30.0, _number(0.0, 3600.0, strict_min=True),
              "Seconds before a provider call times out"),
    FieldSpec("s3_endpoint_enabled", True, _bool, "Accept job outputs on the S3 endpoint"),
    FieldSpec("s3_public_url", "", _http_url("URL"), "Public base URL handed to jobs for S3 uploads"),
    FieldSpec("s3_output_path", "~/.simpletuner/outputs", _path, "Where job outputs are stored"),
    FieldSpec("api_base_url", "https://api.replicate.com", _http_url("URL", allow_empty=False),
              "Replicate API base URL"),
    FieldSpec("webhook_url", "", _http_url("URL"),
              "URL Replicate delivers webhooks to; empty = <public_url>/api/webhooks/<provider>"),
    FieldSpec("hardware_profile", costs.DEFAULT_PROFILE, _choice(tuple(costs.HARDWARE_PROFILES)),
              "Default hardware profile"),
    FieldSpec("models", {}, _models,
              "Replicate model (owner/name) per hardware profile; default "
              "simpletuner/advanced-trainer-<profile>"),
    FieldSpec("version_override", "", _version,
              "Replicate version for every profile (id or owner/name:id); empty = newest"),
    FieldSpec("model_versions", {}, _versions,
              "Replicate model version per hardware profile (key 'default' for all); "
              "unset profiles run their model's newest version"),
    FieldSpec("model_version_ttl", 600.0, _number(0.0, 86400.0),
              "Seconds a model's newest version is cached (0 = ask Replicate every time)"),
    FieldSpec("gpu_prices", {}, _prices, "USD per GPU-second by GPU type or profile"),
    FieldSpec("max_runtime_minutes", 120, _number(1, 7 * 24 * 60, integer=True),
              "Expected maximum runtime, used for cost estimates"),
    FieldSpec("cost_limit_enabled", False, _bool, "Enforce a spending limit"),
    FieldSpec("cost_limit_amount", 0.0, _number(0.0), "Spending limit in USD per period"),
    FieldSpec("cost_limit_period", "monthly", _choice(costs.PERIODS), "daily, weekly or monthly"),
    FieldSpec("cost_limit_action", "warn", _choice(costs.ACTIONS),
              "warn, block or require_approval (hold the submission for approval)"),
    FieldSpec("breaker_failure_threshold", 5, _number(1, 1000, integer=True),
              "Consecutive failures that open the circuit"),
    FieldSpec("breaker_recovery_timeout", 60.0, _number(0.0, 86400.0, strict_min=True),
              "Seconds the circuit stays open before half-opening"),
    FieldSpec("breaker_half_open_max_calls", 3, _number(1, 100, integer=True),
              "Trial calls allowed while half-open"),
    FieldSpec("breaker_success_threshold", 2, _number(1, 100, integer=True),
              "Successful trials that close the circuit"),
)}


def check_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise KeyError(provider)
    return provider


def validate_field(name: str, value: Any) -> Any:
    spec = FIELDS.get(name)
    if spec is None:
        raise InvalidValue(name, f"unknown field (known fields: {', '.join(FIELDS)})", code="unknown_field")
    try:
        return spec.check(value)
    except ValueError as exc:
        raise InvalidValue(name, str(exc)) from None


def validate_update(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a partial update; ``None`` resets a field to its lower layers.  The request
    model (``ProviderUpdate``) admits only known fields, so every name here is one."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        out[name] = None if value is None else validate_field(name, value)
    breaker = {k: out.get(k) for k in ("breaker_half_open_max_calls", "breaker_success_threshold")}
    if (breaker["breaker_half_open_max_calls"] is not None and breaker["breaker_success_threshold"] is not None
            and breaker["breaker_success_threshold"] > breaker["breaker_half_open_max_calls"]):
        raise InvalidValue("breaker_success_threshold", "must not exceed breaker_half_open_max_calls")
    return out


def config_validators() -> dict[str, Callable[[str, Any], Any]]:
    """The config loader's table ``{field: check(path, value)}``: ``providers.<name>.<field>``
    in YAML/INI files is validated (and normalised) at load time, errors naming the key path."""
    return {name: config_validator(name) for name in FIELDS}


def normalise_file_values(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[InvalidValue]]:
    """Validated file values (INI strings become typed values) and the errors found."""
    out: dict[str, Any] = {}
    errors: list[InvalidValue] = []
    for name, value in values.items():
        if value is None:
            continue
        try:
            out[name] = validate_field(name, value)
        except InvalidValue as exc:
            errors.append(exc)
    return out, errors


def config_validator(name: str) -> Callable[[str, Any], Any]:
    """One entry of :func:`config_validators`."""

    def check(path: str, value: Any) -> Any:
        try:
            return validate_field(name, value)
        except InvalidValue as exc:
            raise InvalidValue(path, exc.reason) from None

    return check


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Provider fields that have an environment default (S3), when set."""
    out: dict[str, Any] = {}

    def get(name: str) -> str:
        value = environ.get(name)
        if value is None:
            value = environ.get(name.lower(), "")
        return value.strip()

    proxy = get("HTTPS_PROXY") or get("HTTP_PROXY")
    if proxy:
        out["proxy_url"] = proxy
    if get("NO_PROXY"):
        out["no_proxy"] = _str_list(get("NO_PROXY"))
    if get("SIMPLETUNER_CA_BUNDLE"):
        out["ssl_ca_bundle"] = get("SIMPLETUNER_CA_BUNDLE")
    if get("SIMPLETUNER_SSL_VERIFY"):
        out["ssl_verify"] = get("SIMPLETUNER_SSL_VERIFY").lower() not in ("false", "0", "no", "off")
    if get("SIMPLETUNER_HTTP_TIMEOUT"):
        try:
            timeout = float(get("SIMPLETUNER_HTTP_TIMEOUT"))
            if timeout > 0 and math.isfinite(timeout):
                out["http_timeout"] = timeout
        except ValueError:
            pass
    if get("SIMPLETUNER_PUBLIC_URL"):
        out["s3_public_url"] = get("SIMPLETUNER_PUBLIC_URL").rstrip("/")
    return out


def effective(file_values: Mapping[str, Any], environ: Mapping[str, str],
              api_values: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """``{field: (value, source)}`` for every field."""
    env = env_values(environ)
    out: dict[str, tuple[Any, str]] = {}
    for name, spec in FIELDS.items():
        value, source = spec.default, "default"
        if file_values.get(name) is not None:
            value, source = file_values[name], "file"
        if name in env:
            value, source = env[name], "env"
        if api_values.get(name) is not None:
            value, source = api_values[name], "api"
        if isinstance(value, (list, dict)):
            value = type(value)(value)
        out[name] = (value, source)
    return out


def redact(name: str, value: Any) -> Any:
    """A value safe to show or audit (passwords in proxy URLs masked)."""
    if name == "proxy_url" and isinstance(value, str) and value:
        parts = urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
    return value
