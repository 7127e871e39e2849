"""SSRF guard: every spelling of an internal address is refused before any connection is attempted, and is
allowed only by the operator option that names it.

No test here may send traffic anywhere but loopback: `guard_sockets` fails any other socket connect, and
`fake_dns` answers the made-up names (and refuses any other non-numeric name, so nothing reaches real DNS).
Loopback spellings that an option allows are fetched for real from a server on 127.0.0.1 / ::1; for private
non-loopback addresses only the vetting decision is checked.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpcore
import httpx
import pytest
from PIL import Image

from vlmserve.media import MediaConfig, MediaError, MediaLoader, PinnedAsyncClient
from vlmserve.media.ssrf import address_refusal, host_is_exempt, vet_host

FAKE_DNS = {
    "internal.example": ["10.1.2.3"],
    "mixed.example": ["93.184.216.34", "192.168.0.5"],  # one private answer among public ones is enough
    "rebind.test": ["127.0.0.1"],
    # What resolvers answer for other names of the local host.
    "localhost.": ["127.0.0.1"],
    "sub.localhost": ["127.0.0.1"],  # RFC 6761: *.localhost is loopback (systemd-resolved answers so)
    "ip6-localhost": ["::1"],  # the /etc/hosts alias of ::1 on Debian and Ubuntu
}

# (URL, what the refusal must say). All are refused with the default MediaConfig.
REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("https://127.0.0.1/", "loopback"),
    ("HTTP://127.0.0.1/", "loopback"),
    ("http://user@127.0.0.1/", "loopback"),
    ("http://localhost/", "loopback"),
    ("http://LOCALHOST/", "loopback"),
    ("http://localhost./", "loopback"),  # with the root dot: the same name to a resolver
    ("http://sub.localhost/", "loopback"),
    ("http://ip6-localhost/", "loopback"),
    ("http://127.0.0.2/", "loopback"),  # all of 127/8, not only 127.0.0.1
    ("http://127.255.255.254/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0x7f000001/", "loopback"),  # hex
    ("http://0177.0.0.1/", "not valid"),  # octal: httpx refuses to parse it, which refuses it too
    ("http://017700000001/", "loopback"),  # octal as one number
    ("http://127.000.000.001/", "not valid"),  # zero-padded
    ("http://0x7f.0x0.0x0.0x1/", "loopback"),  # hex per part
    ("http://0x7f.1/", "loopback"),
    ("http://0x7f.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),  # short form
    ("http://0.0.0.0/", "unspecified"),  # Linux routes a connect to 0.0.0.0 to the local host
    ("http://0/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:7f00:1]/", "IPv4-mapped"),
    ("http://[::ffff:a00:1]/", "IPv4-mapped"),  # 10.0.0.1
    ("http://[::ffff:169.254.169.254]/", "IPv4-mapped"),
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://[64:ff9b::7f00:1]/", "NAT64"),
    ("http://[64:ff9b::a00:1]/", "NAT64"),  # NAT64 of 10.0.0.1
    ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", "Teredo"),  # Teredo client 10.0.0.1
    ("http://10.0.0.1/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("http://100.64.0.1/", "shared"),
    ("http://198.18.0.1/", "private"),  # benchmarking range
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[fec0::1]/", "site-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://255.255.255.255/", "reserved"),
    ("http://240.0.0.1/", "reserved"),
    ("http://internal.example/", "resolves to a private address"),
    ("http://mixed.example/cat.png", "resolves to a private address"),
    ("http://rebind.test/", "resolves to a loopback address"),
    ("http://127.0.0.1:80@10.0.0.1/", "private"),  # userinfo that looks like a host
    ("http:/127.0.0.1/", "no host"),
    ("//127.0.0.1/cat.png", "--allowed-local-media-path"),  # scheme-relative: taken as a local path
    ("ws://127.0.0.1/", "scheme 'ws'"),
    ("jar:http://127.0.0.1/!/", "scheme 'jar'"),
    ("ftp://example.com/cat.png", "scheme 'ftp'"),
    ("gopher://localhost:70/_stats", "scheme 'gopher'"),
    ("dict://localhost:11211/stat", "scheme 'dict'"),
    ("file:///etc/passwd", "--allowed-local-media-path"),
    ("/etc/passwd", "--allowed-local-media-path"),
]


def _is_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


@pytest.fixture(autouse=True)
def guard_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail (and record) any socket connect to something other than this host."""
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        attempts.append(address)
        host = address[0] if isinstance(address, tuple) else str(address)
        if not _is_local(host):
            raise AssertionError(f"a test tried to connect to {address!r}, which is not loopback")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    outside = [address for address in attempts if not _is_local(str(address[0]))]
    assert outside == [], f"connections to non-loopback addresses were attempted: {outside}"


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Answer FAKE_DNS names; pass numeric hosts and localhost through; refuse any other name."""
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        lookups.append(name)
        if name in FAKE_DNS:
            return [
                (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in FAKE_DNS[name]
            ]
        if name != "localhost" and not _resolves_without_dns(name):
            raise socket.gaierror(socket.EAI_NONAME, f"test DNS refuses {name!r}")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def _resolves_without_dns(name: str) -> bool:
    try:
        socket.inet_aton(name)  # every IPv4 spelling the C resolver parses numerically
        return True
    except OSError:
        pass
    try:
        ipaddress.IPv6Address(name.split("%")[0])
        return True
    except ValueError:
        return False


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """The real network backend, recording every connect it is asked to make."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
async def client(backend: RecordingBackend) -> AsyncIterator[PinnedAsyncClient]:
    async with PinnedAsyncClient(timeout_s=2.0, user_agent="ssrf-test", network_backend=backend) as pinned:
        yield pinned


class LoopbackServer:
    """Serves a PNG for any path on a loopback address and records the requests' Host headers."""

    PNG = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(PNG, "PNG")

    def __init__(self, host: str) -> None:
        self.hosts: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.hosts.append(self.headers["Host"])
                body = LoopbackServer.PNG.getvalue()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self.httpd = Server((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server_v4() -> Iterator[LoopbackServer]:
    server = LoopbackServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def server_v6() -> Iterator[LoopbackServer]:
    try:
        server = LoopbackServer("::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here ({exc})")
    yield server
    server.close()


# ------------------------------------------------------------------------------- refused by default


@pytest.mark.parametrize(("url", "why"), REFUSED, ids=[url for url, _ in REFUSED])
async def test_refused_by_default_without_connecting(
    url: str, why: str, client: PinnedAsyncClient, backend: RecordingBackend, guard_sockets: list[Any]
) -> None:
    async with MediaLoader(MediaConfig(), http_client=client) as loader:
        with pytest.raises(MediaError) as caught:
            await loader.load_image(url, 0)
    assert caught.value.status_code == 400
    assert why in caught.value.reason
    assert backend.connects == []
    assert guard_sockets == []


async def test_refusal_of_a_name_does_not_reveal_its_address() -> None:
    with pytest.raises(MediaError) as caught:
        await vet_host("internal.example", 80, MediaConfig())
    assert "10.1.2.3" not in caught.value.reason
    assert "--allowed-media-domains internal.example" in caught.value.reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


# ------------------------------------------------------------- allowed by the matching operator option

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "2130706433",
    "0x7f000001",
    "0x7f.0.0.1",
    "127.1",
    "017700000001",
    "0x7f.0x0.0x0.0x1",
    "0.0.0.0",
    "localhost.",
    "sub.localhost",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]


def _options_for(host: str) -> list[MediaConfig]:
    return [MediaConfig(allow_private_network=True), MediaConfig(allowed_media_domains=(host.strip("[]"),))]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
async def test_loopback_spellings_are_fetched_when_allowed(
    host: str, server_v4: LoopbackServer, client: PinnedAsyncClient, backend: RecordingBackend
) -> None:
    url = f"http://{host}:{server_v4.port}/cat.png"
    for config in _options_for(host):
        async with MediaLoader(config, http_client=client) as loader:
            image = await loader.load_image(url, 0)
        assert image.getpixel((0, 0)) == (1, 2, 3)
    # Exempting some other name does not exempt this one.
    async with MediaLoader(
        MediaConfig(allowed_media_domains=("images.internal",)), http_client=client
    ) as other:
        with pytest.raises(MediaError):
            await other.load_image(url, 0)
    assert len(server_v4.hosts) == 2
    assert server_v4.hosts[0] == f"{host}:{server_v4.port}"  # Host header keeps the name as written
    # The connection went to the address resolved during vetting, not to a name.
    assert all(ipaddress.ip_address(connected) for connected, _ in backend.connects)


async def test_ipv6_loopback_is_fetched_when_allowed(
    server_v6: LoopbackServer, client: PinnedAsyncClient
) -> None:
    url = f"http://[::1]:{server_v6.port}/cat.png"
    for config in _options_for("[::1]"):
        async with MediaLoader(config, http_client=client) as loader:
            assert (await loader.load_image(url, 0)).size == (3, 2)
    assert len(server_v6.hosts) == 2


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "fe80::1",
        "fc00::1",
        "224.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::7f00:1",
        "::ffff:a00:1",
        "127.0.0.2",
        "ip6-localhost",
        "internal.example",
    ],
)
async def test_private_hosts_pass_vetting_only_with_an_option(host: str) -> None:
    with pytest.raises(MediaError):
        await vet_host(host, 80, MediaConfig())
    for config in _options_for(host):
        vetted = await vet_host(host, 80, config)
        assert vetted.host == host
        assert vetted.addresses  # what the transport would connect to; no connection made here
    with pytest.raises(MediaError):
        await vet_host(host, 80, MediaConfig(allowed_media_domains=("images.internal",)))


def test_domain_patterns() -> None:
    patterns = ("*.corp.example", "Images.Internal", "10.0.0.5", "[::1]")
    assert host_is_exempt("a.corp.example", patterns)
    assert host_is_exempt("a.b.CORP.example.", patterns)
    assert not host_is_exempt("corp.example", patterns)
    assert not host_is_exempt("evilcorp.example", patterns)
    assert not host_is_exempt("corp.example.evil", patterns)
    assert host_is_exempt("images.internal", patterns)
    assert not host_is_exempt("x.images.internal", patterns)
    assert host_is_exempt("10.0.0.5", patterns)
    assert not host_is_exempt("10.0.0.50", patterns)
    assert host_is_exempt("::1", patterns)


# -------------------------------------------------------------------------------------------- pinning


async def test_connections_go_only_to_the_vetted_address(
    server_v4: LoopbackServer,
    client: PinnedAsyncClient,
    backend: RecordingBackend,
    fake_dns: list[str],
    guard_sockets: list[Any],
) -> None:
    """The name is resolved once, during vetting; the client connects to that answer, never re-resolving."""
    config = MediaConfig(allowed_media_domains=("rebind.test",))
    async with MediaLoader(config, http_client=client) as loader:
        image = await loader.load_image(f"http://rebind.test:{server_v4.port}/cat.png", 0)
    assert image.size == (3, 2)
    assert fake_dns.count("rebind.test") == 1
    assert backend.connects == [("127.0.0.1", server_v4.port)]
    assert guard_sockets == [("127.0.0.1", server_v4.port)]  # the socket guard sees real connects too
    assert server_v4.hosts == [f"rebind.test:{server_v4.port}"]


async def test_an_unpinned_request_fails_closed(server_v4: LoopbackServer, client: PinnedAsyncClient) -> None:
    with pytest.raises(httpx.ConnectError, match="not vetted"):
        await client.get(f"http://127.0.0.1:{server_v4.port}/cat.png")
    assert server_v4.hosts == []


async def test_environment_proxies_are_ignored(
    monkeypatch: pytest.MonkeyPatch, server_v4: LoopbackServer, backend: RecordingBackend
) -> None:
    # A proxy would resolve the name itself, out of the guard's sight.
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    config = MediaConfig(allow_private_network=True)
    async with (
        PinnedAsyncClient(timeout_s=2.0, user_agent="t", network_backend=backend) as client,
        MediaLoader(config, http_client=client) as loader,
    ):
        assert (await loader.load_image(f"http://127.0.0.1:{server_v4.port}/x.png", 0)).size == (3, 2)
    assert backend.connects == [("127.0.0.1", server_v4.port)]
