"""Who may connect: calling AE titles, each optionally bound to hosts or networks.

Host names are resolved once, at start-up, so a DNS outage can't stall an
association; a name that does not resolve stops the server with the key.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessConfigError(ValueError):
    """An allowed_calling_aets entry that can't be used; the message names it."""


@dataclass(frozen=True)
class AccessPolicy:
    """``None`` rules: everyone is allowed. Otherwise AE title -> networks
    (an empty tuple: from any address)."""

    rules: dict[str, tuple[Network, ...]] | None = None

    def check(self, calling_ae_title: str, peer_ip: str) -> str:
        """"" if allowed, else why not (for the log and the rejection)."""
        if self.rules is None:
            return ""
        networks = self.rules.get(calling_ae_title.strip())
        if networks is None:
            return f"calling AE title {calling_ae_title!r} is not in access.allowed_calling_aets"
        if not networks:
            return ""
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return f"peer address {peer_ip!r} is not an IP address"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in network for network in networks):
            return ""
        return f"calling AE title {calling_ae_title!r} is not allowed from {peer_ip}"


def _networks(host: str, key: str) -> list[Network]:
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AccessConfigError(f"{key}: host {host!r} does not resolve ({exc.strerror})") from None
    return [ipaddress.ip_network(info[4][0]) for info in infos]


def build_access_policy(entries: list) -> AccessPolicy:  # type: ignore[type-arg]
    """From ``access.allowed_calling_aets`` (AE titles or {ae_title, hosts} entries)."""
    if not entries:
        return AccessPolicy(None)
    rules: dict[str, tuple[Network, ...]] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            rules[entry.strip()] = ()
            continue
        networks: list[Network] = []
        for j, host in enumerate(entry.hosts):
            networks += _networks(host, f"access.allowed_calling_aets[{i}].hosts[{j}]")
        rules[entry.ae_title.strip()] = tuple(networks)
    return AccessPolicy(rules)


def peer_ip(peer_address: str) -> str:
    """"127.0.0.1:5000" or "[::1]:5000" -> the IP part."""
    host = peer_address.rsplit(":", 1)[0]
    return host.strip("[]")
