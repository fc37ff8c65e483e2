"""Which network addresses a download may connect to, checked after DNS and on every redirect hop.

A URL list comes from a web page, so it is untrusted: a URL (or a redirect) can point at this
machine, the local network or a cloud's metadata service, and a downloader that fetches it hands
internal data to whoever wrote the list. The rule is applied where a connection is opened: the
host name is resolved once, *every* address it resolves to is checked, and the socket is opened to
a checked address literal, so a DNS server that answers differently the second time (DNS
rebinding) never gets a second question. Redirects open their connections through the same
check, so every hop is covered; TLS still verifies the certificate against the host name.

Refused by default: loopback, private networks, link-local, shared (CGNAT) and other non-public
ranges, including the same addresses written as IPv4-mapped, 6to4 or NAT64 IPv6, and integer or
octal hosts (``2130706433``), which the resolver turns into dotted addresses before the check.
``allow_private=True`` (``--allow-private``) opens those; unspecified (``0.0.0.0``, ``::``),
multicast, broadcast and cloud metadata addresses are refused always.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

# The option that lets private addresses through, as the refusals name it (only ever shown, never matched).
ALLOW_HINT = "--allow-private"
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle instance metadata
        "169.254.170.2",  # AWS ECS task credentials
        "168.63.129.16",  # Azure platform (WireServer)
        "100.100.100.200",  # Alibaba Cloud metadata
        "fd00:ec2::254",  # AWS metadata over IPv6
        "fd00:ec2::23",  # AWS DNS over IPv6
    )
)
# IPv6 ranges whose last 32 bits are an IPv4 address: NAT64 (both) and the old IPv4-compatible form.
_EMBEDDING = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))
_BROADCAST = ipaddress.ip_address("255.255.255.255")


class AddressRefused(Exception):
    """A connection the address rule (or a port check) stopped before any byte was sent."""

    def __init__(self, host: str, reason: str, kind: str = "refused", by_rule: bool = False) -> None:
        self.host = host
        self.reason = reason
        self.kind = kind
        self.by_rule = by_rule  # refused by the address rule (private, reserved, metadata), not for a port or a socket
        super().__init__(reason)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, 6to4, Teredo client, NAT64, compatible), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip.is_loopback or ip.is_unspecified:  # ::1 and :: are what they are, not 0.0.0.1 or 0.0.0.0
        return None
    if any(ip in net for net in _EMBEDDING):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _classify(ip: IPAddress) -> tuple[bool, str] | None:
    """(always refused?, what the address is), or None for a public address."""
    if ip in METADATA_ADDRESSES:
        return True, "a cloud metadata address"
    if ip.is_unspecified:
        return True, "an unspecified address (it means this machine)"
    if ip.is_multicast:
        return True, "a multicast address"
    if ip == _BROADCAST:
        return True, "the broadcast address"
    if ip.is_loopback:
        return False, "a loopback address (this machine)"
    if ip.is_link_local:
        return False, "a link-local address"
    if ip.is_private:
        return False, "a private-network address"
    if not ip.is_global:
        return False, "a reserved, shared or otherwise non-public address"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a download may connect to, and how host names become addresses.

    ``allow``: networks always allowed (e.g. your own image server), unless the address is one of
    the always-refused kinds. ``resolve``: ``async (host, port) -> [address, ...]``; None uses the
    system resolver (tests pass a fake one, so no test depends on real DNS).
    """

    allow_private: bool = False
    allow: tuple[IPNetwork, ...] = ()
    resolve: Resolver | None = None

    @classmethod
    def build(
        cls, allow_private: bool = False, allow: Iterable[str] = (), resolve: Resolver | None = None
    ) -> "AddressPolicy":
        """A policy from plain values (networks as text such as ``192.168.1.0/24``)."""
        nets = tuple(ipaddress.ip_network(a, strict=False) for a in allow)
        return cls(allow_private=allow_private, allow=nets, resolve=resolve)

    def verdict(self, address: str) -> tuple[str, str, bool] | None:
        """(the address as shown, what it is, refused always?) when it may not be used; None when it may."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address, "not an IP address", True
        shown = str(ip)
        found = _classify(ip)
        inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        if inner is not None:
            embedded = _classify(inner)
            if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on the wire
                found = embedded
            if embedded is not None:
                found, shown = embedded, f"{ip} (IPv4 {inner})"
        if found is None:
            return None
        always, what = found
        if not always and (self.allow_private or any(a in net for net in self.allow for a in (ip, inner) if a)):
            return None
        return shown, what, always

    def problem(self, address: str, host: str | None = None) -> str | None:
        """Why a download must not connect to this address (reached from host), or None when it may."""
        refused = self.refusal(address, host)
        return None if refused is None else refused.reason

    def refusal(self, address: str, host: str | None = None) -> AddressRefused | None:
        """The refusal of this address by the rule (its reason, ``by_rule`` set), or None when it may connect."""
        found = self.verdict(address)
        if found is None:
            return None
        shown, what, always = found
        if always:
            hint = f"never fetched, even with {ALLOW_HINT}"
        else:
            hint = f"use {ALLOW_HINT} to fetch from private networks"
        if host is not None and host.strip("[]") != address:
            return AddressRefused(host, f"{host} resolves to {shown}, {what}; {hint}", by_rule=True)
        return AddressRefused(host or address, f"{shown} is {what}; {hint}", by_rule=True)


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (an address literal is its own answer)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise httpcore.ConnectError(f"cannot resolve the host name {host!r} ({why})") from None
    return [str(info[4][0]) for info in infos]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address rule in front of every TCP connection."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int, timeout: float | None) -> list[str]:
        """Resolve once, within the connect timeout; duplicates dropped, order kept."""
        resolve = self.policy.resolve or system_resolve
        try:
            found = await asyncio.wait_for(resolve(host, port), timeout)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no DNS answer for {host!r} within {timeout:g} s") from None
        addresses = list(dict.fromkeys(str(a) for a in found))
        if not addresses:
            raise httpcore.ConnectError(f"the host name {host!r} resolves to no address")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Check every address host resolves to, then connect to a checked one (never resolving again)."""
        if not 1 <= port <= 65535:
            raise AddressRefused(host, f"port {port} is out of range 1-65535", "bad_url")
        addresses = await self.resolve(host, port, timeout)
        for address in addresses:  # one bad address refuses the name: a rebinding server may use either
            refused = self.policy.refusal(address, host)
            if refused is not None:
                raise refused
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Never used by a download: a URL cannot name a Unix socket."""
        raise AddressRefused(path, f"{path} is a Unix socket; only network addresses are downloaded from")

    async def sleep(self, seconds: float) -> None:
        """What the connection pool waits with, from the wrapped backend."""
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport whose connections all go through GuardedBackend (no proxies from the environment)."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        verify: Any = True,
        limits: httpx.Limits,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        super().__init__(verify=verify, limits=limits, trust_env=False)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            # Fail loudly rather than download without the check if httpx changes its insides.
            raise RuntimeError("this httpx version has no connection pool to guard; install httpx 0.28")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy, inner),
        )


async def url_refusal(url: str, policy: AddressPolicy, cache: dict[str, AddressRefused | None],
                      timeout: float = 5.0) -> AddressRefused | None:
    """The address rule's refusal of a URL's host before anything connects to it (a search result), or None.

    The host is resolved once (``cache``: host -> verdict, so a page of results from one site asks
    once); a name that does not resolve now is let through: the download decides on it then.
    """
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii", errors="replace")
    if host not in cache:
        resolve = policy.resolve or system_resolve
        try:
            found = await asyncio.wait_for(resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                           timeout)
        except (TimeoutError, httpcore.ConnectError, httpcore.ConnectTimeout, OSError):
            found = []
        cache[host] = next((r for r in (policy.refusal(str(a), host) for a in found) if r is not None), None)
    return cache[host]
