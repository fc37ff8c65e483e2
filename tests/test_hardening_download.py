"""Issue 17, items 1-3: download refuses internal addresses, survives malformed lines, and stays small.

Nothing here leaves this machine: live servers listen on 127.0.0.0/8 only, other addresses come
from a fake resolver, and every connection the download opens is recorded (a connection to
anything outside 127.0.0.0/8 fails the test instead of being made).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpcore
import pytest
from PIL import Image

from ursa.acquire.addresses import AddressPolicy, AddressRefused, GuardedBackend, system_resolve
from ursa.acquire.download import download_images
from ursa.acquire.fetch import MemoryBudget
from ursa.acquire.manifest import read_manifest
from ursa.acquire.urls import url_problem
from ursa.errors import ImageError
from ursa.vision.images import ImageInfo, decode_cost, open_image, read_header

try:
    from tests.fault_server import FaultServer, make_images
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from fault_server import FaultServer, make_images

REPO = Path(__file__).resolve().parents[1]
FAST = dict(timeout=0.5, retries=1, backoff=0.01, max_retry_after=1.0, progress=False)
FAKE_DNS = {
    "internal.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "six.test": ["::1"],
    "mixed.test": ["93.184.216.34", "10.0.0.1"],  # one public answer does not make a private one safe
    "public.test": ["93.184.216.34"],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    """The fake DNS above; names the system answers locally (hosts file, numbers) go to the system resolver."""
    if host in FAKE_DNS:
        return FAKE_DNS[host]
    if host in ("localhost", "2130706433"):  # /etc/hosts and inet_aton: no DNS query leaves the machine
        return await system_resolve(host, port)
    try:
        import ipaddress

        return [str(ipaddress.ip_address(host))]
    except ValueError:
        raise httpcore.ConnectError(f"cannot resolve the host name {host!r} (fake DNS)") from None


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Stands in for the network: records every connection asked for, opens none."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.calls.append((host, port))
        raise httpcore.ConnectError("recording backend: no real connection")

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@pytest.fixture
def connections(monkeypatch):
    """Every TCP connection the download really opens; one outside 127.0.0.0/8 is refused and recorded."""
    seen: list[tuple[str, int]] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def guarded(self, host, port, *args, **kwargs):
        seen.append((host, port))
        if not host.startswith("127."):
            raise httpcore.ConnectError(f"test guard: {host} is off this machine")
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", guarded)
    return seen


def _write_list(path: Path, urls: list[str]) -> Path:
    path.write_text("\n".join(urls) + "\n")
    return path


def _rows(dest: Path) -> dict[str, dict[str, str]]:
    return {r["url"]: r for r in read_manifest(dest / "downloads.csv")}


# ----------------------------------------------------------------------------- 1. the address rule


@pytest.mark.parametrize("address, words", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private-network"), ("172.16.5.4", "private-network"), ("192.168.1.1", "private-network"),
    ("fc00::1", "private-network"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "non-public"), ("::ffff:127.0.0.1", "IPv4 127.0.0.1"), ("::ffff:10.0.0.1", "IPv4 10.0.0.1"),
    ("2002:7f00:1::", "IPv4 127.0.0.1"), ("64:ff9b::a00:1", "IPv4 10.0.0.1"), ("::7f00:1", "IPv4 127.0.0.1"),
])
def test_private_addresses_are_refused_unless_allowed(address, words):
    why = AddressPolicy().problem(address)
    assert why is not None and words in why and "use --allow-private" in why
    assert AddressPolicy(allow_private=True).problem(address) is None


@pytest.mark.parametrize("address, words", [
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    ("::ffff:169.254.169.254", "cloud metadata"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("255.255.255.255", "broadcast"),
])
def test_metadata_unspecified_and_multicast_are_refused_always(address, words):
    everything = AddressPolicy.build(allow=["0.0.0.0/0", "::/0"])
    for policy in (AddressPolicy(), AddressPolicy(allow_private=True), everything):
        why = policy.problem(address)
        assert why is not None and words in why and "never fetched" in why


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert AddressPolicy().problem(address) is None


def test_allowed_networks_open_only_themselves():
    policy = AddressPolicy.build(allow=["127.0.0.2/32"])
    assert policy.problem("127.0.0.2") is None
    assert policy.problem("::ffff:127.0.0.2") is None
    assert "loopback" in policy.problem("127.0.0.1")


@pytest.mark.parametrize("host", ["internal.test", "metadata.test", "six.test", "mixed.test", "10.0.0.1", "::1"])
def test_fake_resolver_internal_answers_never_reach_a_connection(host):
    inner = RecordingBackend()
    backend = GuardedBackend(AddressPolicy(resolve=fake_resolve), inner)
    with pytest.raises(AddressRefused) as info:
        asyncio.run(backend.connect_tcp(host, 80, timeout=1.0))
    assert inner.calls == []
    assert info.value.kind == "refused" and "--allow-private" in info.value.reason
    if host.endswith(".test"):
        assert info.value.reason.startswith(f"{host} resolves to ")


def test_allowed_host_is_connected_by_its_checked_address_not_resolved_again():
    inner = RecordingBackend()
    backend = GuardedBackend(AddressPolicy(resolve=fake_resolve), inner)
    with pytest.raises(httpcore.ConnectError, match="recording backend"):
        asyncio.run(backend.connect_tcp("public.test", 443, timeout=1.0))
    assert inner.calls == [("93.184.216.34", 443)]  # the literal that was checked: no second DNS question


def test_download_refuses_internal_hosts_before_connecting(tmp_path, connections):
    """Literal, integer, mapped and named internal hosts: a refused row each, no request on the live server."""
    with FaultServer() as srv:
        port = srv.port
        urls = {
            "literal": f"http://127.0.0.1:{port}/img/0.jpg",
            "integer": f"http://2130706433:{port}/img/0.jpg",  # the resolver makes it 127.0.0.1
            "localhost": f"http://localhost:{port}/img/0.jpg",
            "zeros": f"http://0.0.0.0:{port}/img/0.jpg",
            "mapped": f"http://[::ffff:127.0.0.1]:{port}/img/0.jpg",
            "internal": "http://internal.test/img/0.jpg",
            "metadata": "http://metadata.test/latest/meta-data/",
            "six": "http://six.test/img/0.jpg",
        }
        f = _write_list(tmp_path / "u.txt", list(urls.values()))
        dest = tmp_path / "d"
        s = download_images({"c": f}, dest, address_policy=AddressPolicy(resolve=fake_resolve), **FAST)
        assert sum(srv.hits.values()) == 0
    assert connections == []
    rows = _rows(dest)
    assert s.refused == len(urls) and s.refused_address == len(urls) and s.saved == s.failed == 0
    for key, url in urls.items():
        r = rows[url]
        assert r["status"] == "refused" and r["error"].startswith("refused: "), (key, r)
        assert r["bytes"] == "" and r["sha256"] == "" and r["file"] == ""  # nothing of a response recorded
    assert rows[urls["literal"]]["error"] == (
        "refused: 127.0.0.1 is a loopback address (this machine); use --allow-private to fetch from private networks"
    )
    assert "resolves to 127.0.0.1" in rows[urls["integer"]]["error"]
    assert "cloud metadata" in rows[urls["metadata"]]["error"]
    assert "never fetched" in rows[urls["zeros"]]["error"]
    assert "--allow-private fetches from your own network" in s.format()
    assert not list((dest / "c").iterdir())


def test_redirect_hops_are_checked(tmp_path, connections):
    """127.0.0.2 is allowed for the test; its redirects to 127.0.0.1 and metadata are refused at the hop."""
    with FaultServer(host="127.0.0.2") as allowed, FaultServer(host="127.0.0.1") as internal:
        hop = f"http://127.0.0.1:{internal.port}/img/1.jpg"
        urls = {
            "loopback": allowed.url(f"goto?url={hop}"),
            "metadata": allowed.url("goto?url=http://169.254.169.254/latest/meta-data/"),
            "named": allowed.url("goto?url=http://metadata.test/computeMetadata/v1/"),
            "mapped": allowed.url(f"goto?url=http://[::ffff:127.0.0.1]:{internal.port}/img/2.jpg"),
            "same_host": allowed.url(f"goto?url={allowed.url('img/3.jpg')}"),  # an allowed hop still works
        }
        f = _write_list(tmp_path / "u.txt", list(urls.values()))
        dest = tmp_path / "d"
        policy = AddressPolicy.build(allow=["127.0.0.2/32"], resolve=fake_resolve)
        s = download_images({"c": f}, dest, address_policy=policy, **FAST)
        assert sum(internal.hits.values()) == 0  # the internal server never saw a request
        assert allowed.count(urlsplit_path(urls["loopback"])) == 1
    assert {h for h, _ in connections} == {"127.0.0.2"}
    rows = _rows(dest)
    assert rows[urls["same_host"]]["status"] == "saved"
    for key in ("loopback", "metadata", "named", "mapped"):
        r = rows[urls[key]]
        assert r["status"] == "refused", (key, r)
        assert "(a redirect from 127.0.0.2 led there)" in r["error"], (key, r)
        assert r["bytes"] == "" and r["sha256"] == ""
    assert "127.0.0.1 is a loopback address" in rows[urls["loopback"]]["error"]
    assert "169.254.169.254 is a cloud metadata address" in rows[urls["metadata"]]["error"]
    assert "metadata.test resolves to 169.254.169.254" in rows[urls["named"]]["error"]
    assert s.saved == 1 and s.refused == 4


def urlsplit_path(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_https_connects_to_the_checked_address_and_verifies_the_host_name(tmp_path, monkeypatch, connections):
    """TLS still checks the certificate against the URL's host name, though the socket goes to the checked IP."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setitem(FAKE_DNS, "images.test", ["127.0.0.2"])
    srv = FaultServer(host="127.0.0.2")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv.httpd.socket = ctx.wrap_socket(srv.httpd.socket, server_side=True)
    with srv:
        good = f"https://images.test:{srv.port}/img/0.jpg"
        wrong_name = f"https://127.0.0.2:{srv.port}/img/1.jpg"  # the certificate is not for this name
        f = _write_list(tmp_path / "u.txt", [good, wrong_name])
        policy = AddressPolicy.build(allow=["127.0.0.2/32"], resolve=fake_resolve)
        s = download_images({"c": f}, tmp_path / "d", address_policy=policy, **{**FAST, "retries": 0})
    rows = _rows(tmp_path / "d")
    assert rows[good]["status"] == "saved", rows[good]
    assert rows[wrong_name]["status"] == "failed" and "certificate" in rows[wrong_name]["error"].lower()
    assert {h for h, _ in connections} == {"127.0.0.2"} and s.saved == 1


def test_refused_address_is_tried_again_once_allowed(tmp_path):
    with FaultServer() as srv:
        f = _write_list(tmp_path / "u.txt", [srv.url("img/0.jpg"), "ftp://a.example/x.jpg"])
        dest = tmp_path / "d"
        first = download_images({"c": f}, dest, **FAST)
        assert (first.refused, first.refused_address, sum(srv.hits.values())) == (2, 1, 0)
        again = download_images({"c": f}, dest, **FAST)  # still refused, checked again (no request)
        assert (again.refused, again.skipped, sum(srv.hits.values())) == (1, 1, 0)
        allowed = download_images({"c": f}, dest, allow_private=True, **FAST)
        assert (allowed.saved, allowed.skipped) == (1, 1)
    assert _rows(dest)[srv.url("img/0.jpg")]["status"] == "saved"


# ----------------------------------------------------------------------------- 2. malformed lines


@pytest.mark.parametrize("url, reason", [
    ("http://[::1/x.jpg", "malformed URL (Invalid IPv6 URL)"),
    ("http://127.0.0.1:99999/x.jpg", "port 99999 is out of range 1-65535"),
    ("http://a.example:0/x.jpg", "port 0 is out of range 1-65535"),
    ("http://a.example:abc/x.jpg", "port 'abc' is not a number"),
    ("http:///x.jpg", "no host name"),
    ("http://exa mple.com/x.jpg", "spaces or control characters"),
    ("http://xn--/x.jpg", "malformed URL"),
    ("http://[::g]/x.jpg", "malformed URL"),
])
def test_url_problem_names_what_is_wrong(url, reason):
    status, why = url_problem(url)
    assert status == "failed" and reason in why


def test_url_problem_passes_good_urls_and_refuses_schemes():
    for url in ("https://a.example/x.jpg", "http://[::1]:8080/x.jpg", "http://2130706433/x", "http://é.example/x"):
        assert url_problem(url) is None, url
    assert url_problem("ftp://a.example/x")[0] == "refused"


def test_malformed_lines_are_one_failed_row_each_and_the_rest_downloads(tmp_path):
    bad = ["http://[::1/x.jpg", "http://127.0.0.1:99999/x.jpg", "http:///x.jpg", "http://xn--/x.jpg",
           "http://a.example:abc/x.jpg"]
    with FaultServer() as srv:
        good = [srv.url("img/0.jpg"), srv.url("img/1.jpg")]
        f = _write_list(tmp_path / "urls_c.txt", [good[0], *bad, good[1]])
        dest = tmp_path / "d"
        s = download_images([f], dest, allow_private=True, **FAST)
    rows = _rows(dest)
    assert set(rows) == set(good) | set(bad)
    assert s.saved == 2 and s.failed == len(bad) and s.failures["bad_url"] == len(bad)
    for url in bad:
        assert rows[url]["status"] == "failed" and rows[url]["error"].startswith("bad_url: malformed URL"), url
    assert rows["http://127.0.0.1:99999/x.jpg"]["error"] == "bad_url: malformed URL: port 99999 is out of range 1-65535"


def test_redirect_to_a_bad_port_or_malformed_url_gets_a_real_reason(tmp_path):
    from urllib.parse import quote

    with FaultServer() as srv:
        port = srv.url("goto?url=" + quote("http://127.0.0.1:99999/x.jpg", safe=""))
        bracket = srv.url("goto?url=" + quote("http://[::1/x.jpg", safe=""))
        idna = srv.url("goto?url=" + quote("http://xn--/x.jpg", safe=""))
        f = _write_list(tmp_path / "u.txt", [port, bracket, idna])
        s = download_images({"c": f}, tmp_path / "d", allow_private=True, **FAST)
        assert srv.count(urlsplit_path(bracket)) == 1  # not retried: asking again gives the same redirect
    rows = _rows(tmp_path / "d")
    assert s.failures == {"bad_url": 3}  # not "unexpected", not "connection"
    assert rows[port]["error"] == "bad_url: port 99999 is out of range 1-65535"
    assert rows[bracket]["error"].startswith("bad_url: malformed redirect target")
    assert rows[idna]["error"].startswith("bad_url: malformed redirect target")


# ----------------------------------------------------------------------------- 3. memory


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def big_pngs(n: int, w: int = 9000, h: int = 9000) -> dict[str, bytes]:
    """n different PNGs of w x h RGB pixels, mostly one colour: ~260 KB each, 324 MB each decoded."""
    comp = zlib.compressobj(9)
    row = b"\0" + bytes((30, 120, 200)) * w
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    tail = _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return {f"{i}.png": head + _chunk(b"tEXt", b"n\0" + str(i).encode()) + tail for i in range(n)}


def _jpeg(size: tuple[int, int], quality: int = 80) -> bytes:
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_header_gives_the_cost_before_any_decode():
    png = big_pngs(1, 4000, 3000)["0.png"]
    info = read_header(png)
    assert (info.format, info.mode, info.size) == ("PNG", "RGB", (4000, 3000))
    assert 48_000_000 <= decode_cost(info, 1024) < 60_000_000  # 4 bytes a pixel, plus a small result
    photo = ImageInfo("JPEG", "RGB", (8000, 6000))  # a 48 Mpx photo: decoded at 1/4 scale for 1024 px
    assert decode_cost(photo, 1024) < 0.25 * 8000 * 6000 * 4
    with pytest.raises(ImageError, match="too large"):
        read_header(big_pngs(1, 10000, 10000)["0.png"])  # over Pillow's bomb limit: refused from the header


def test_reduced_decode_is_small_and_still_checks_every_byte():
    data = _jpeg((4000, 3000))
    im = open_image(data, max_side=1000)
    assert im.size == (1000, 750)  # libjpeg's 1/4 scale: nothing bigger was ever decoded
    png = io.BytesIO()
    Image.new("RGB", (3000, 1000), (10, 20, 30)).save(png, "PNG")
    assert open_image(png.getvalue(), max_side=700).size == (750, 250)  # reduced by 4 right after decoding
    for broken in (data[: len(data) // 2], png.getvalue()[: len(png.getvalue()) // 2]):
        with pytest.raises(ImageError) as info:
            open_image(broken, max_side=500)
        assert info.value.kind in ("truncated", "corrupt")


def test_memory_budget_runs_big_decodes_one_at_a_time_and_small_ones_together():
    async def main() -> tuple[int, int]:
        budget = MemoryBudget(500)
        active = peak_big = peak_small = 0

        async def job(cost: int) -> None:
            nonlocal active, peak_big, peak_small
            async with budget.hold(cost):
                active += 1
                if cost > 250:
                    peak_big = max(peak_big, active)
                else:
                    peak_small = max(peak_small, active)
                await asyncio.sleep(0.01)
                active -= 1

        await asyncio.gather(*(job(400) for _ in range(4)))
        await asyncio.gather(*(job(10) for _ in range(20)), job(10_000))  # bigger than the budget: runs alone
        assert budget.used == 0
        return peak_big, peak_small

    peak_big, peak_small = asyncio.run(main())
    assert peak_big == 1 and peak_small > 5


CHILD = """
import json, sys
from ursa.acquire.download import download_images
s = download_images({"big": sys.argv[1]}, sys.argv[2], progress=False, max_pics=0, timeout=60.0, retries=0,
                    allow_private=True)
# VmHWM is this program's own peak: getrusage's ru_maxrss keeps the forking parent's (pytest's) RSS across exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss_kb": hwm, "saved": s.saved, "failed": s.failed}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc/self/status (Linux only)")
def test_sixteen_huge_pngs_download_in_bounded_memory(tmp_path):
    """16 x 81 Mpx PNGs (260 KB each): 3.8 GB peak before the budget and the big blocks, ~0.37 GB now."""
    images = big_pngs(16)
    with FaultServer(images) as srv:
        f = _write_list(tmp_path / "urls.txt", [srv.url(f"img/{name}") for name in images])
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(f), str(tmp_path / "d")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    peak_mb = got["maxrss_kb"] / 1024
    print(f"16 x 81 Mpx PNG: peak RSS {peak_mb:.0f} MB in {time.perf_counter() - t0:.1f} s")
    assert got["saved"] == 16 and got["failed"] == 0
    assert peak_mb < 800, f"download peaked at {peak_mb:.0f} MB for 16 huge PNGs (one decode needs ~330 MB)"
    for p in (tmp_path / "d" / "big").iterdir():
        with Image.open(p) as im:
            assert max(im.size) == 1024 and p.suffix == ".jpg"  # shrunk to --max-size and re-encoded


def test_large_photo_is_kept_as_downloaded_when_max_size_is_0(tmp_path):
    data = _jpeg((5000, 4000))
    with FaultServer({"photo.jpg": data}) as srv:
        f = _write_list(tmp_path / "u.txt", [srv.url("img/photo.jpg")])
        s = download_images({"c": f}, tmp_path / "d", max_size=0, allow_private=True, **FAST)
    assert s.saved == 1
    saved = next((tmp_path / "d" / "c").iterdir())
    assert saved.read_bytes() == data  # checked at reduced size, saved byte for byte


def test_known_content_is_not_decoded_again(tmp_path, monkeypatch):
    import ursa.acquire.download as download_module

    calls = []
    real = download_module.prepare_image
    monkeypatch.setattr(download_module, "prepare_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    images = make_images(1)
    with FaultServer(images) as srv:
        f = _write_list(tmp_path / "u.txt", [srv.url("img/0.jpg")] + [srv.url(f"img/0.jpg?copy={i}") for i in range(5)])
        s = download_images({"c": f}, tmp_path / "d", workers=1, allow_private=True, **FAST)
    assert (s.saved, s.duplicate) == (1, 5)
    assert len(calls) == 1
