"""Local fakes of the keyless image-search APIs `ursa search` uses, answering in their documented shapes.

One server holds both, on a loopback address:

    /openverse/v1/images/?q=..&page=N&page_size=M   Openverse's image search: {result_count, page_count,
                                                     page_size, page, results: [{url, foreign_landing_url,
                                                     creator, license, license_version, license_url, ...}]}
    /commons/w/api.php?...&gsroffset=K&gsrlimit=M   MediaWiki's query with generator=search, prop=imageinfo,
                                                     formatversion=2: {continue: {gsroffset}, query: {pages: [
                                                     {index, title, imageinfo: [{url, thumburl, descriptionurl,
                                                     mime, extmetadata: {Artist, LicenseShortName, LicenseUrl}}]}]}}
    /img/<name>                                      a small JPEG (so the results can be downloaded)

Faults are set per provider and page (``faults={("openverse", 2): "ratelimit"}``): ``ratelimit``
answers 429 with ``Retry-After: 1`` the first time, then the page; ``error500`` answers 500 always;
``malformed`` a body that is not JSON; ``nested`` JSON nested a hundred thousand deep; ``wrongshape`` JSON
without the documented list; ``apierror`` (Commons) MediaWiki's ``{"error": {...}}`` with HTTP 200;
``repeat`` (Openverse) page 1's results again, as a provider that ignores ``page`` does; ``slow`` the
answer 3 s late, calling ``on_slow`` first (a test presses Ctrl-C there). ``creator``:
one creator for every Openverse result (hostile text: formulas, control characters, Markdown). ``private`` lists result numbers whose URL
points at a private address (``private_host``) instead of the image host. Run it alone for the docs:
``python tests/search_fakes.py --port 8766``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

try:
    from tests.fault_server import make_images
except ImportError:
    from fault_server import make_images

OPENVERSE_LICENSES = [("by", "2.0"), ("cc0", "1.0"), ("by-sa", "4.0"), ("by-nc", "2.0"), ("pdm", "1.0")]
COMMONS_LICENSES = [("CC BY-SA 4.0", "https://creativecommons.org/licenses/by-sa/4.0"),
                    ("CC0", "http://creativecommons.org/publicdomain/zero/1.0/deed.en"),
                    ("CC BY 2.0", "https://creativecommons.org/licenses/by/2.0"),
                    ("Public domain", "")]


class FakeSearch:
    """Both fake APIs on one ThreadingHTTPServer in a daemon thread; ``total`` results per provider."""

    def __init__(self, host: str = "127.0.0.2", port: int = 0, total: int = 45, faults: dict | None = None,
                 private: dict | None = None, image_host: str | None = None, private_host: str = "10.0.0.7",
                 creator: str | None = None, wikimedia: bool = False) -> None:
        self.total = total
        self.wikimedia = wikimedia
        self.on_slow: Callable[[], None] | None = None  # called when a request with the "slow" fault arrives
        self.creator = creator
        self.faults = dict(faults or {})  # (provider, page number from 1) -> fault
        self.private = {k: set(v) for k, v in (private or {}).items()}  # provider -> result numbers
        self.private_host = private_host
        self.hits: Counter[tuple[str, int]] = Counter()
        self.agents: set[str] = set()  # the User-Agent headers the APIs were asked with
        self.times: dict[tuple[str, int], list[float]] = {}
        self.lock = threading.Lock()
        self.images = make_images(2 * total)  # distinct pictures: result i of openverse is 2i, of commons 2i+1
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.image_host = image_host or f"{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def openverse(self) -> str:
        """The base URL to give as the openverse endpoint."""
        return f"http://{self.host}:{self.port}/openverse/v1/images/"

    @property
    def commons(self) -> str:
        """The base URL to give as the commons endpoint."""
        return f"http://{self.host}:{self.port}/commons/w/api.php"

    def image_url(self, provider: str, i: int) -> str:
        """Result i's image URL (a private address for the numbers in ``private``); with ``wikimedia`` Openverse's
        result i is Commons' result i as Openverse gives it (the original where Commons gives a thumbnail)."""
        if i in self.private.get(provider, ()):
            return f"http://{self.private_host}/{provider}/{i}.jpg"
        if self.wikimedia:
            name = f"Grizzly_bear_{i}.jpg"
            thumb = f"thumb/a/ab/{name}/1024px-{name}" if provider == "commons" else f"a/ab/{name}"
            return f"http://{self.image_host}/wikipedia/commons/{thumb}"
        return f"http://{self.image_host}/img/{provider}_{i}.jpg"

    def openverse_item(self, i: int) -> dict:
        code, version = OPENVERSE_LICENSES[i % len(OPENVERSE_LICENSES)]
        where = {"cc0": "publicdomain/zero", "pdm": "publicdomain/mark"}.get(code, f"licenses/{code}")
        return {"id": f"ov-{i}", "title": f"bear {i}", "indexed_on": "2024-01-01T00:00:00Z",
                "foreign_landing_url": f"https://www.flickr.com/photos/someone/{i}", "url": self.image_url("openverse", i),
                "creator": self.creator if self.creator is not None else f"Photographer {i}", "creator_url": f"https://www.flickr.com/photos/p{i}",
                "license": code, "license_version": version,
                "license_url": f"https://creativecommons.org/{where}/{version}/", "provider": "flickr",
                "source": "flickr", "category": None, "filesize": None, "filetype": "jpg", "tags": [],
                "attribution": f"\"bear {i}\" by Photographer {i}", "fields_matched": ["title"], "mature": False,
                "height": 480, "width": 640, "thumbnail": f"https://api.openverse.org/v1/images/ov-{i}/thumb/",
                "detail_url": f"https://api.openverse.org/v1/images/ov-{i}/", "related_url": ""}

    def commons_page(self, i: int) -> dict:
        name, url = COMMONS_LICENSES[i % len(COMMONS_LICENSES)]
        title = f"File:Grizzly bear {i}.jpg"
        meta = {"LicenseShortName": {"value": name, "source": "commons-desc-page", "hidden": ""},
                "Artist": {"value": f"<a href=\"//commons.wikimedia.org/wiki/User:U{i}\" title=\"User:U{i}\">"
                                    f"User &amp; {i}</a>", "source": "commons-desc-page"}}
        if url:
            meta["LicenseUrl"] = {"value": url, "source": "commons-desc-page", "hidden": ""}
        return {"pageid": 1000 + i, "ns": 6, "title": title, "index": i + 1, "imagerepository": "local",
                "imageinfo": [{"url": f"https://upload.wikimedia.org/wikipedia/commons/a/ab/Grizzly_{i}.jpg",
                               "thumburl": self.image_url("commons", i), "thumbwidth": 1024, "thumbheight": 768,
                               "descriptionurl": f"https://commons.wikimedia.org/wiki/File:Grizzly_bear_{i}.jpg",
                               "mime": "image/jpeg", "extmetadata": meta}]}

    def start(self) -> "FakeSearch":
        self.thread.start()
        return self

    def __enter__(self) -> "FakeSearch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(fake: FakeSearch) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _fault(self, provider: str, page: int) -> bool:
            key = (provider, page)
            with fake.lock:
                fake.agents.add(self.headers.get("User-Agent", ""))
                fake.hits[key] += 1
                fake.times.setdefault(key, []).append(time.monotonic())
                seen = fake.hits[key]
            fault = fake.faults.get(key)
            if fault == "ratelimit" and seen == 1:
                self._send(429, b'{"detail": "Request was throttled."}', headers={"Retry-After": "1"})
            elif fault == "error500":
                self._send(500, b"<html>Internal Server Error</html>", "text/html")
            elif fault == "malformed":
                self._send(200, b'{"results": [{"url": "http://x/1.jpg", ')  # cut off mid-object
            elif fault == "slow":  # the answer comes 3 s late; ``on_slow`` runs when the request arrives
                if fake.on_slow is not None:
                    fake.on_slow()
                time.sleep(3)
                return False
            elif fault == "badredirect":  # a Location no URL parser accepts
                self._send(302, b"", "text/plain", headers={"Location": "http://[::1/x"})
            elif fault == "nested":
                self._send(200, b"[" * 100_000 + b"]" * 100_000)
            elif fault == "wrongshape":
                self._send(200, json.dumps({"results": "none", "query": {"pages": {"1": {}}}}).encode())
            elif fault == "apierror":
                self._send(200, json.dumps({"error": {"code": "internal_api_error_DBQueryError",
                                                      "info": "A database query error has occurred."}}).encode())
            else:
                return False
            return True

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path.startswith("/img/"):
                provider, _, i = parts.path[5:].rpartition(".")[0].partition("_")
                self._send(200, fake.images[f"{2 * int(i) + (provider == 'commons')}.jpg"], "image/jpeg")
            elif parts.path == "/openverse/v1/images/":
                page, size = int(q.get("page", 1)), int(q.get("page_size", 20))
                if self._fault("openverse", page):
                    return
                if fake.faults.get(("openverse", page)) == "repeat":
                    page = 1
                items = [fake.openverse_item(i) for i in range((page - 1) * size, min(page * size, fake.total))]
                pages = -(-fake.total // size)
                self._send(200, json.dumps({"result_count": fake.total, "page_count": pages, "page_size": size,
                                            "page": page, "results": items}).encode())
            elif parts.path == "/commons/w/api.php":
                offset, limit = int(q.get("gsroffset", 0)), int(q.get("gsrlimit", 10))
                if self._fault("commons", offset // limit + 1):
                    return
                pages = [fake.commons_page(i) for i in range(offset, min(offset + limit, fake.total))]
                pages.reverse()  # generator results come in any order: "index" is the rank
                body: dict = {"batchcomplete": True, "query": {"pages": pages}}
                if offset + limit < fake.total:
                    body["continue"] = {"gsroffset": offset + limit, "continue": "gsroffset||"}
                self._send(200, json.dumps(body).encode())
            else:
                self._send(404, b'{"detail": "Not found."}')

    return Handler


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--total", type=int, default=45)
    args = ap.parse_args()
    with FakeSearch(args.host, args.port, args.total, faults={("openverse", 2): "ratelimit", ("commons", 3): "error500"},
                    private={"commons": {3}}, private_host="169.254.169.254") as fake:  # metadata: refused always
        print(f"openverse: {fake.openverse}\ncommons:   {fake.commons}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
