"""Addresses: which hosts are this machine, and how a wildcard bind is reached.

Shared by the registry (who may register without a token), the configuration (when ``up``
needs a token), the client, the replica and ``up`` (where to reach a server bound to every
interface).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

#: Where a server bound to every interface (or to no host) is reached from this machine.
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def reachable_host(host: str) -> str:
    """``host`` as a client on this machine dials it: a wildcard bind through loopback."""
    return _WILDCARDS.get(host, host)


Resolver = Callable[[str], list[str]]
"""Host name → its addresses (``localhost_addresses`` by default; tests inject a fake DNS)."""


def localhost_addresses(name: str) -> list[str]:
    """Every address the system resolver gives ``name``; empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def is_loopback(host: str, resolve: Resolver = localhost_addresses) -> bool:
    """Whether ``host`` (as :func:`parse_endpoint` returns it) names this machine only.

    An address is judged as it is. Of host names only ``localhost`` and ``*.localhost`` can
    be loopback, and only when every address they resolve to is: ``/etc/hosts`` (or a DNS
    answer) may map ``evil.localhost`` anywhere. Other names are not resolved at all, so a
    registrant cannot make the API server wait on DNS.
    """
    name = host.strip("[]").lower().removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        addresses = resolve(name)
        return bool(addresses) and all(_loopback_address(a) for a in addresses)
    return _loopback_address(name)


def _loopback_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False  # a host name: where it points is not known without resolving it
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
