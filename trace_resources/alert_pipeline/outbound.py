"""The outbound policy of alert delivery: which addresses a tenant's channel may reach.

A channel names a host (webhook / Slack URL, SMTP server) chosen by a tenant, so delivery
must never become a way into the platform's own network. Every connection goes through
`OutboundPolicy.connect`: the host is resolved once, EVERY resolved address is checked, and
the socket connects to a checked address (pinned: a DNS answer that changes between the check
and the connection can not redirect it). Refused: loopback, link-local, private, multicast,
unspecified, reserved, shared (100.64/10), cloud metadata addresses and anything else not
globally reachable, and IPv6 addresses embedding an IPv4 one (mapped, compatible, NAT64,
6to4, Teredo) whose IPv4 address is refused. Numeric hosts in every form the C resolver
accepts (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`) are read as the address they are.

Operators allow internal receivers with `TRACE_ALERT_OUTBOUND_ALLOW`: comma-separated CIDRs
(`10.1.0.0/16`, `127.0.0.1`) whose addresses pass, and/or `host[:port]` entries whose host
name passes (whatever it resolves to). Rules are checked when written (`RuleStore`) and again
at every delivery attempt.

Messages never name the address a host name resolved to (that would be an oracle of the
platform's DNS): `localhost resolves to a loopback address`, `127.0.0.1 is a loopback address`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trace_resources.errors import TraceError

if TYPE_CHECKING:
    from trace_resources.settings import Settings

__all__ = [
    "ALLOW_SETTING",
    "OutboundPolicy",
    "OutboundRefused",
    "HostUnresolved",
    "refusal",
    "resolve",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOW_SETTING = "TRACE_ALERT_OUTBOUND_ALLOW"

# instance metadata services (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS IPv6; AWS ECS
# task metadata; Alibaba; Oracle)
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "192.0.0.192")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")
_NUMERIC = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}$")


class OutboundRefused(TraceError):
    """A host the outbound policy refuses; the message says why (fit for the tenant)."""


class HostUnresolved(OutboundRefused):
    """A host that does not resolve (now: DNS may answer again, so a delivery retries)."""


def _embedded_v4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address.teredo is not None:
        return "Teredo", address.teredo[1]
    if any(address in net for net in _NAT64):
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _COMPATIBLE and int(address) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why the policy refuses this address (e.g. `a loopback address`), or None for a public
    one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
        embedded = _embedded_v4(address)
        if embedded is not None:
            kind, v4 = embedded
            inner = refusal(v4)
            if inner is not None:
                return f"{inner} ({kind})"
            # a public IPv4 address reached through a translation mechanism: refused too (the
            # receiver can publish the IPv4 address itself)
            return f"an IPv4-embedding address ({kind})"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address in _METADATA, "a cloud metadata address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (isinstance(address, ipaddress.IPv4Address) and address in _SHARED, "a shared address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "a private address"),
    )
    for refused, reason in checks:
        if refused:
            return reason
    return None if address.is_global else "not a public address"


def literal(host: str) -> IPAddress | None:
    """The address a host names by itself (any numeric form), or None for a host name."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    bare = bare[:-1] if bare.endswith(".") else bare
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if _NUMERIC.match(bare):
        try:  # the legacy forms the C resolver reads as IPv4 (octal, hex, short, one number)
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (tests replace this: there is no DNS server)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(
        dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    )


def _allow_entry(item: str) -> tuple[IPNetwork | None, tuple[str, int | None] | None]:
    if "/" in item:
        return ipaddress.ip_network(item, strict=False), None
    try:
        return ipaddress.ip_network(ipaddress.ip_address(item.strip("[]"))), None
    except ValueError:
        pass
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", item)
    if match is None:
        raise ValueError(item)
    host = (match.group(1) or match.group(3)).lower().rstrip(".")
    port = match.group(2) or match.group(4)
    return None, (host, int(port) if port else None)


@dataclass(frozen=True)
class OutboundPolicy:
    """Public addresses only, plus the operator's allow-list."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> OutboundPolicy:
        networks: list[IPNetwork] = []
        hosts: list[tuple[str, int | None]] = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            try:
                network, host = _allow_entry(item)
            except ValueError:
                raise TraceError(
                    f"{ALLOW_SETTING}: {item!r} is neither a CIDR (10.0.0.0/8, 127.0.0.1) nor "
                    "a host[:port] (hooks.internal:8443)"
                ) from None
            if network is not None:
                networks.append(network)
            if host is not None:
                hosts.append(host)
        return cls(tuple(networks), tuple(hosts))

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        return cls.parse(settings.alert_outbound_allow)

    def _host_allowed(self, host: str, port: int) -> bool:
        name = host.lower().rstrip(".")
        return any(h == name and p in (None, port) for h, p in self.hosts)

    def _address_allowed(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def addresses(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses to connect to for host:port; OutboundRefused otherwise."""
        address = literal(host)
        if address is not None:
            found = [address]
        else:
            try:
                found = resolve(host, port)
            except (OSError, UnicodeError, ValueError):
                found = []
            if not found:
                raise HostUnresolved(f"{host} does not resolve")
        if self._host_allowed(host, port):
            return found
        for each in found:
            reason = None if self._address_allowed(each) else refusal(each)
            if reason is not None:
                if address is not None:
                    raise OutboundRefused(f"{host} is {reason}")
                raise OutboundRefused(f"{host} resolves to {reason}")
        return found

    def connect(
        self,
        host: str,
        port: int,
        timeout: float | None,
        source_address: Any = None,
    ) -> socket.socket:
        """A TCP connection to a checked address of host:port (tried in resolver order)."""
        error: OSError | None = None
        for address in self.addresses(host, port):
            try:
                return socket.create_connection((str(address), port), timeout, source_address)
            except OSError as exc:
                error = exc
        assert error is not None
        raise error
