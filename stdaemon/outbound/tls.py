"""The CA bundle a provider's TLS connections trust (``ssl_ca_bundle``, S3).

``Certificate.loadPEM`` reads only the first certificate of a PEM file, so the
bundle is split and every certificate in it is loaded.  :func:`load_ca_bundle`
reads a file: call it off the reactor thread.  ``twisted.internet.ssl`` (and pyOpenSSL) is
imported by the first call, so a configuration without a CA bundle does not load it for this.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet import ssl


class CABundleError(ValueError):
    """The configured CA bundle is missing, unreadable or holds no PEM certificate."""


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def split_pem_certificates(data: bytes) -> list[bytes]:
    """Every certificate block in a PEM bundle, in order."""
    return [m.group(0) for m in _PEM_CERT.finditer(data)]


def load_ca_bundle(path: str) -> list[ssl.Certificate]:
    """Read a PEM bundle and parse all of its certificates (small file)."""
    from twisted.internet import ssl

    try:
        with open(path, "rb") as handle:
            data = handle.read(8 * 1024 * 1024)
    except FileNotFoundError:
        raise CABundleError(f"CA bundle {path!r} does not exist") from None
    except OSError as exc:
        raise CABundleError(f"CA bundle {path!r} is not readable: {exc.strerror}") from None
    blocks = split_pem_certificates(data)
    if not blocks:
        raise CABundleError(f"CA bundle {path!r} contains no PEM certificate")
    certificates = []
    for index, block in enumerate(blocks, 1):
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except Exception:
            raise CABundleError(
                f"CA bundle {path!r}: certificate #{index} is not a valid PEM certificate"
            ) from None
    return certificates
