"""Outbound settings (S3): what one provider's HTTP client is built from, and NO_PROXY.

No I/O: the environment is passed in (``Config.environ``).
:func:`outbound_settings` layers a provider's file/API values over the
environment defaults; :func:`proxy_bypassed` answers NO_PROXY for one target.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 30.0
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class OutboundSettings:
    """What one provider's outbound client is built from."""

    https_proxy: str = ""
    http_proxy: str = ""
    no_proxy: tuple[str, ...] = ()
    ssl_verify: bool = True
    ssl_ca_bundle: str = ""
    http_timeout: float = DEFAULT_TIMEOUT
    # (mtime_ns, size) of the CA bundle when read; part of the cache key so a
    # replaced bundle file is picked up on the next call too.
    ca_bundle_stamp: tuple = field(default=(), compare=True)


def _env(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    if value is None:
        value = environ.get(name.lower(), "")
    return value.strip()


def parse_no_proxy(value: str | list | tuple | None) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(item.strip().lower() for item in value if item and item.strip())


def parse_bool(value: Any, default: bool = True) -> bool:
    if isinstance(value, bool):
        return value
    if value is None or value == "":
        return default
    return str(value).strip().lower() not in FALSE_WORDS


def outbound_settings(values: Mapping[str, Any], environ: Mapping[str, str]) -> OutboundSettings:
    """Effective outbound settings for one provider.

    ``values`` are the provider's settings from the config file and the API
    (``proxy_url``, ``ssl_verify``, ``ssl_ca_bundle``, ``http_timeout``,
    ``no_proxy``); keys that are absent or ``None`` fall back to the
    environment defaults (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``,
    ``SIMPLETUNER_CA_BUNDLE``, ``SIMPLETUNER_SSL_VERIFY``,
    ``SIMPLETUNER_HTTP_TIMEOUT``) and then to the built-in defaults.
    """
    proxy_url = values.get("proxy_url")
    if proxy_url is None:
        https_proxy = _env(environ, "HTTPS_PROXY")
        http_proxy = _env(environ, "HTTP_PROXY")
    else:
        https_proxy = http_proxy = str(proxy_url).strip()

    no_proxy = values.get("no_proxy")
    no_proxy = parse_no_proxy(_env(environ, "NO_PROXY") if no_proxy is None else no_proxy)

    ssl_verify = values.get("ssl_verify")
    if ssl_verify is None:
        ssl_verify = parse_bool(_env(environ, "SIMPLETUNER_SSL_VERIFY"), True)

    ca_bundle = values.get("ssl_ca_bundle")
    if ca_bundle is None:
        ca_bundle = _env(environ, "SIMPLETUNER_CA_BUNDLE")

    timeout = values.get("http_timeout")
    if timeout is None:
        raw = _env(environ, "SIMPLETUNER_HTTP_TIMEOUT")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            timeout = DEFAULT_TIMEOUT
    timeout = float(timeout)
    if timeout <= 0:
        timeout = DEFAULT_TIMEOUT

    return OutboundSettings(
        https_proxy=https_proxy,
        http_proxy=http_proxy,
        no_proxy=no_proxy,
        ssl_verify=bool(ssl_verify),
        ssl_ca_bundle=os.path.expanduser(str(ca_bundle or "")),
        http_timeout=timeout,
    )




def proxy_bypassed(host: str, port: int, no_proxy: tuple[str, ...]) -> bool:
    """True when ``NO_PROXY`` says ``host:port`` is reached directly."""
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy:
        if entry == "*":
            return True
        entry_host, entry_port = entry, None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):
            entry_host, _, port_text = entry.rpartition(":")
            if port_text.isdigit():
                entry_port = int(port_text)
            else:
                entry_host = entry
        entry_host = entry_host.strip("[]")
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry_host, strict=False):
                    return True
            except ValueError:
                pass
            continue
        bare = entry_host.lstrip(".")
        if not bare:
            continue
        if host == bare or host.endswith("." + bare):
            return True
    return False




def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and API responses."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()
