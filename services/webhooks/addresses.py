"""Which addresses a webhook receiver may have, and resolving a host to checked addresses.

A receiver must be a public (globally routed) unicast address. Refused, unless a setting
allows them: loopback, private (RFC 1918, unique local), link-local, shared (CGNAT,
100.64.0.0/10), and the documentation and benchmarking ranges; always refused: cloud
metadata addresses, unspecified, multicast and reserved ones. An IPv6 address that carries
an IPv4 one (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo) is judged by the IPv4 address
too. `TANDEM_WEBHOOK_ALLOW_PRIVATE` allows the first group; `TANDEM_WEBHOOK_ALLOWED_CIDRS`
allows exactly the networks it lists, whatever they are (the tests allow 127.0.0.1/32).

The check runs when an endpoint is created and again before every attempt, on the addresses
the attempt then connects to (`transport` pins the connection to them: no second lookup a
rebinding DNS server could answer differently).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services: AWS (IPv4, IPv6, ECS, EKS pod identity), GCP and Azure (the
# same 169.254.169.254), Alibaba Cloud, Oracle Cloud's 192.0.0.192.
METADATA = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "100.100.100.200",
        "192.0.0.192",
    )
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NEVER = ("metadata", "unspecified", "multicast", "reserved")  # allow_private does not help

Resolver = Callable[..., list[tuple[Any, ...]]]
_lookups = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")


class RefusedAddress(ValueError):
    """The URL's host is, or resolves to, an address webhooks may not go to."""


@dataclass(frozen=True)
class Policy:
    allow_private: bool = False
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> Policy:
        networks = tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in settings.webhook_allowed_cidrs.split(",")
            if part.strip()
        )
        return cls(settings.webhook_allow_private, networks)

    def refusal(self, address: str) -> str | None:
        """Why `address` is refused (e.g. "a private address"), or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0
        if any(ip in network for network in self.allowed):
            return None
        for candidate in _judged(ip):
            if any(candidate in network for network in self.allowed):
                continue
            kind = kind_of(candidate)
            if kind is None or (self.allow_private and kind not in NEVER):
                continue
            if kind == "metadata":
                return "a cloud metadata address"
            return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
        return None


def _judged(ip: IPAddress) -> list[IPAddress]:
    """The addresses that decide: an IPv4-mapped or NAT64 address is its IPv4 address; a
    6to4 or Teredo one is itself and the IPv4 address(es) it carries."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    carried: list[IPAddress] = [ip]
    if ip.sixtofour is not None:
        carried.append(ip.sixtofour)
    if ip.teredo is not None:
        carried.extend(ip.teredo)
    return carried


def kind_of(ip: IPAddress) -> str | None:
    """What makes an address non-public, or None for a public unicast one."""
    if ip in METADATA:
        return "metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT:
        return "shared (CGNAT)"
    if ip.is_reserved or (isinstance(ip, ipaddress.IPv4Address) and int(ip) == 0xFFFFFFFF):
        return "reserved"
    if ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "private"
    if not ip.is_global:
        return "non-public"
    return None


def resolve(
    host: str, port: int, timeout_s: float, resolver: Resolver = socket.getaddrinfo
) -> list[str]:
    """The host's addresses (an IP literal is its own), within `timeout_s`; RefusedAddress
    if it does not resolve."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    future = _lookups.submit(resolver, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RefusedAddress(f"{host} did not resolve within {timeout_s:g} s") from None
    except (OSError, UnicodeError) as error:
        raise RefusedAddress(f"{host} does not resolve ({error})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise RefusedAddress(f"{host} has no address")
    return addresses


def checked_addresses(
    host: str,
    port: int,
    policy: Policy,
    timeout_s: float,
    resolver: Resolver = socket.getaddrinfo,
) -> list[str]:
    """The host's addresses, every one of them allowed by `policy` (RefusedAddress names the
    first that is not, and why)."""
    addresses = resolve(host, port, timeout_s, resolver)
    for address in addresses:
        reason = policy.refusal(address)
        if reason is not None:
            shown = host if host == address else f"{host} resolves to {address},"
            raise RefusedAddress(
                f"{shown} {reason}: webhooks are sent to public addresses only "
                "(TANDEM_WEBHOOK_ALLOW_PRIVATE / TANDEM_WEBHOOK_ALLOWED_CIDRS allow others)"
            )
    return addresses
