"""Which workers may join the table by registration, checked before the queen sends them anything.

Registration makes the queen connect to a URL it was given, so unchecked it is a
port scanner and an oracle for anything the queen can reach (a metadata address
answers "HTTP 403", a closed port "refused"). The queen therefore probes only:

- the inventory's nodes, by the name written in `address` or by what it resolves to;
- networks the operator named (`--register-network CIDR`);
- loopback, when the queen itself listens on loopback.

A host name is resolved first and every address it resolves to must pass. The
table is capped (`max_workers`), and ids and node names are short safe words
because they end up in URL paths and metric labels.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from rbee_worker.protocol.errors import ErrorCode, RbeeError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAME_RE = re.compile(r"[A-Za-z0-9:][A-Za-z0-9._:-]{0,63}")  # ':' for IPv6 hosts as node names
MAX_MODEL_NAME = 200
MAX_WORKERS = 1024
RESOLVE_TIMEOUT = 5.0


def refused(host: str, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.FORBIDDEN,
        f"not registered: {host} is {why}; the queen probes only inventory nodes and allowed networks",
        status=403,
        details={"field": "url", "host": host},
        hint="add the node to the inventory, or start the queen with --register-network CIDR",
    )


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    node_hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = True
    max_workers: int = MAX_WORKERS

    @classmethod
    def build(
        cls,
        node_addresses: Iterable[str],
        networks: Iterable[str] = (),
        *,
        allow_loopback: bool,
        max_workers: int = MAX_WORKERS,
    ) -> RegistrationPolicy:
        """ValueError names a network that does not parse."""
        nets: list[IPNetwork] = []
        for text in networks:
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"--register-network {text!r} is not a CIDR such as 10.0.0.0/24") from None
        hosts = frozenset(a.strip().lower() for a in node_addresses if a.strip())
        return cls(hosts, tuple(nets), allow_loopback, max_workers)

    def _ip_allowed(self, ip: IPAddress, node_ips: set[IPAddress]) -> bool:
        if ip.is_loopback and self.allow_loopback:
            return True
        return ip in node_ips or any(ip in net for net in self.networks)

    async def admit(self, host: str) -> None:
        """Return when `host` may be probed; RbeeError 403 (nothing contacted) otherwise."""
        name = host.strip().lower()
        if name in self.node_hosts:
            return
        addresses = await _resolve(name)
        if not addresses:
            raise refused(host, "not resolvable")
        node_ips = await self._node_ips()
        bad = [str(ip) for ip in addresses if not self._ip_allowed(ip, node_ips)]
        if bad:
            raise refused(host, f"not an inventory node or allowed network ({', '.join(bad[:3])})")

    async def _node_ips(self) -> set[IPAddress]:
        found = await asyncio.gather(*(_resolve(h) for h in self.node_hosts))
        return {ip for group in found for ip in group}


async def _resolve(name: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(name)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_name(field: str, value: str) -> str:
    """A worker id or node name: it goes into URL paths, logs and metric labels."""
    if not NAME_RE.fullmatch(value):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"{field}: expected 1-64 letters, digits, '.', '_', ':' or '-', not starting with '.', '_', '-'",
            status=400,
            details={"field": field},
        )
    return value


def check_model_name(value: str) -> str:
    if len(value) > MAX_MODEL_NAME or not value.isprintable():
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"model: expected a printable name of at most {MAX_MODEL_NAME} characters",
            status=400,
            details={"field": "model"},
        )
    return value
