"""Which network addresses the downloader may connect to: public unicast only, unless allow-listed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_problem(ip: str) -> str | None:
    """Why `ip` must not be connected to ("loopback", "private", ...), or None if it is public."""
    try:
        addr: IPAddress = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "invalid_address"
    if isinstance(addr, ipaddress.IPv6Address):
        # ::ffff:10.0.0.1 and 2002:a00:1:: (6to4) reach IPv4 hosts: judge the IPv4 address they carry
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            return address_problem(str(mapped))
    # Order matters: 127.0.0.1 is also "private" in Python's tables; name the most specific kind.
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(addr, f"is_{kind}"):
            return kind
    if not addr.is_global:  # shared (100.64/10), documentation ranges and the like
        return "not_global"
    return None


def split_host_port(entry: str) -> tuple[str, int | None]:
    entry = entry.strip().lower()
    if entry.startswith("["):  # [::1]:8080
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


@dataclass(frozen=True)
class NetPolicy:
    """The address rule plus `allow_hosts`, the one way through it (host or host:port entries)."""

    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for e in self.allow_hosts:  # fail on a malformed entry now, not per URL
            split_host_port(e)

    def allowed(self, host: str, port: int) -> bool:
        """True when the URL's host (as written in the URL) is allow-listed for this port."""
        host = host.strip("[]").lower().rstrip(".")
        for entry in self.allow_hosts:
            h, p = split_host_port(entry)
            if h == host and (p is None or p == port):
                return True
        return False

    def refusal(self, host: str, port: int, ip: str) -> str | None:
        """Why connecting to `ip` (resolved from `host`) is refused, or None when it may go ahead."""
        if self.allowed(host, port):
            return None
        return address_problem(ip)
