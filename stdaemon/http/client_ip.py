"""Client IP derivation and CIDR matching (S6) — pure functions.

The client is the direct peer, unless the peer is a trusted proxy; then
``X-Forwarded-For`` is walked from the right, skipping trusted proxies, and the
first untrusted address is the client (``X-Real-IP`` when there is no XFF).
Headers from untrusted peers are ignored: the first XFF entry is whatever the
client wrote and is never trusted.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses; raises ValueError naming the bad item."""
    networks = []
    for item in items:
        text = str(item).strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR: {text!r}") from None
    return tuple(networks)


def parse_ip(text: str) -> Optional[Address]:
    text = (text or "").strip()
    if text.startswith("[") and "]" in text:          # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1 and "." in text:        # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: Optional[Address], networks: Sequence[Network]) -> bool:
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


def derive_client_ip(peer: str, forwarded_for: Sequence[str], real_ip: Optional[str],
                     trusted: Sequence[Network]) -> str:
    """The client address as a string (the peer's text when unparseable).

    ``forwarded_for`` holds every X-Forwarded-For header value (each may be a
    comma-separated list), in the order received."""
    peer_ip = parse_ip(peer)
    if not in_networks(peer_ip, trusted):
        return str(peer_ip) if peer_ip is not None else peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    if hops:
        for hop in reversed(hops):
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                # Garbage in the chain: stop at the last address we can trust.
                break
            if not in_networks(hop_ip, trusted):
                return str(hop_ip)
            peer_ip = hop_ip
        return str(peer_ip)
    if real_ip:
        real = parse_ip(real_ip)
        if real is not None:
            return str(real)
    return str(peer_ip)


def is_loopback(address: str) -> bool:
    parsed = parse_ip(address)
    return bool(parsed is not None and parsed.is_loopback)
