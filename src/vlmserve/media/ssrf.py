"""Server-side request forgery guard: which hosts an image URL may make the server connect to.

Owns: resolving a URL's host ourselves, refusing it when any resolved address is not a public unicast
address (loopback, private, link-local, shared/CGNAT, multicast, reserved, unspecified, and IPv6 forms that
wrap such an IPv4 address), and the operator exemptions (allowed_media_domains, allow_private_network).
The result, `VettedHost`, lists the addresses that were checked; the transport connects only to those, so a
second DNS answer can never sneak in (no DNS-rebinding gap).

Does not know: HTTP, redirects or bodies (fetch.py), nor how connections are made (transport.py).

NOTE: a host written as a number in any spelling (2130706433, 0x7f.1, 0177.0.0.1, 127.1) is not parsed
here. It goes through getaddrinfo like any name, which applies the same inet_aton rules the OS would use
to connect, and the addresses it returns are what gets checked. Parsing them ourselves would be a second,
possibly different, opinion about where the connection goes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from vlmserve.media.config import MediaConfig
from vlmserve.media.errors import MediaError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: last 32 bits are the IPv4 target
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated RFC 4291 form ::a.b.c.d


@dataclass(frozen=True)
class VettedHost:
    """A host name and the addresses it resolved to, all of which passed the policy."""

    host: str  # as the HTTP client sends it to the connection pool (ASCII / punycode, no brackets)
    addresses: tuple[str, ...]  # in resolver order; the transport connects to these and nothing else


def _embedded_ipv4(address: ipaddress.IPv6Address) -> Iterator[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses that an IPv6 address carries, with the name of the wrapping."""
    if address.ipv4_mapped is not None:
        yield "IPv4-mapped", address.ipv4_mapped
    if address in _NAT64_WELL_KNOWN:
        yield "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        yield "6to4", address.sixtofour
    if address.teredo is not None:
        yield "Teredo", address.teredo[1]  # (server, client): the client is the host traffic reaches
    if address in _IPV4_COMPATIBLE:
        yield "IPv4-compatible", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)


def address_refusal(address: IPAddress) -> str | None:
    """Why connecting to `address` is refused by default, or None for a public unicast address."""
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if isinstance(address, ipaddress.IPv6Address):
        for wrapping, ipv4 in _embedded_ipv4(address):
            reason = address_refusal(ipv4)
            if reason is not None:
                return f"an IPv6 address wrapping {ipv4} ({wrapping}), which is {reason}"
            if wrapping in ("IPv4-mapped", "NAT64"):
                # These reach exactly the embedded IPv4 host (a dual-stack socket, a DNS64/NAT64 network),
                # so a public embedded address makes the whole address acceptable.
                return None
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if not address.is_global:
        return "an address that is not globally routable"
    return None


def host_is_exempt(host: str, allowed_media_domains: tuple[str, ...]) -> bool:
    """Whether `host` matches an operator entry: exact (case-insensitive) or "*.suffix" for subdomains."""
    host = host.lower().rstrip(".").strip("[]")
    for entry in allowed_media_domains:
        pattern = entry.lower().rstrip(".").strip("[]")
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".corp.example"
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pattern:
            return True
    return False


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for a TCP connection, in resolver order, without blocking the loop.

    Tests replace socket.getaddrinfo (or this function) to simulate DNS answers.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # dict.fromkeys: drop the duplicates getaddrinfo returns per protocol, keep the order.
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def vet_host(host: str, port: int, config: MediaConfig) -> VettedHost:
    """Resolve `host` once and check every address against the policy; raise MediaError if refused.

    Exempt hosts (allowed_media_domains, or everything with allow_private_network) are still resolved
    here, so that the connection goes to the addresses resolved now and the name is not looked up twice.
    """
    try:
        async with asyncio.timeout(config.fetch_timeout_s):
            addresses = await resolve_host(host, port)
    except TimeoutError:
        raise MediaError(
            f"resolving host {host!r} took longer than fetch_timeout_s={config.fetch_timeout_s} s"
        ) from None
    except (OSError, UnicodeError) as exc:
        raise MediaError(f"could not resolve host {host!r} ({exc}); check the URL") from None
    if not addresses:
        raise MediaError(f"host {host!r} resolved to no address; check the URL")

    if config.allow_private_network or host_is_exempt(host, config.allowed_media_domains):
        return VettedHost(host=host, addresses=tuple(addresses))

    for text in addresses:
        try:
            reason = address_refusal(ipaddress.ip_address(text))
        except ValueError:
            reason = "an address that could not be parsed"
        if reason is None:
            continue
        # The address itself is shown only when the user wrote it: for names it could reveal internal DNS.
        if _is_ip_literal(host):
            target = f"host {host!r} is {reason}"
        else:
            logger.info("refused image host %r: it resolves to %s, %s", host, text, reason)
            target = f"host {host!r} resolves to {reason}"
        raise MediaError(
            f"{target}; fetching images from private or internal networks is refused to protect the "
            f"server (SSRF). An operator can allow this host with allowed_media_domains "
            f"(--allowed-media-domains {host}) or all hosts with allow_private_network "
            f"(--allow-private-network)."
        )
    return VettedHost(host=host, addresses=tuple(addresses))
