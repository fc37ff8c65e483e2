"""Image-search providers as data: how to ask one for a page of results and how to read its answer.

A provider is a small class with a name, a base URL, the environment variables that point it
elsewhere (``URSA_<NAME>_ENDPOINT``) or carry a user's key, ``request`` (query and cursor -> URL and
headers) and ``parse`` (the decoded JSON -> one ``Page``); no I/O, so each answer shape is tested
alone and ``search`` owns the network. ``PROVIDERS`` is the registry ``--provider`` names come
from; a new provider is a class here and one entry there. The request and response shapes relied
on are written down in docs/search.md.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlencode

from ursa.acquire.urls import CREDIT_COLUMNS
from ursa.errors import UrsaError
from ursa.util.names import printable


class SearchError(UrsaError):
    """A search that cannot start as asked: an unknown provider, a missing key, a bad endpoint or option."""


class AnswerError(Exception):
    """A provider's answer that is not the documented shape (or says it failed): ends that provider's paging."""


@dataclass(frozen=True)
class Found:
    """One search result: the image URL and where it comes from, under what licence (the search CSV's row)."""

    url: str
    source_page: str = ""
    creator: str = ""
    license: str = ""
    license_url: str = ""
    provider: str = ""

    def row(self) -> list[str]:
        """The row of urls_<class>.csv, in SEARCH_COLUMNS order."""
        return [self.url, *(getattr(self, c) for c in CREDIT_COLUMNS)]


@dataclass
class Page:
    """One page of a provider's answer: its results in rank order and the cursor of the next page (None: last)."""

    results: list[Found] = field(default_factory=list)
    next: Any = None


_TAG = re.compile(r"<[^>]*>")


def plain_text(value: Any) -> str:
    """Text from a field that may hold HTML (Commons' Artist is a link): tags dropped, entities decoded, one line,
    control characters (a terminal's escape sequences, bidi overrides) visibly escaped rather than passed on."""
    if not isinstance(value, str):
        return ""
    return printable(" ".join(html.unescape(_TAG.sub(" ", value)).split()))


def _text(d: Any, key: str) -> str:
    """A string field as given (the image URL: download's rules judge it), "" when absent or not a string."""
    v = d.get(key) if isinstance(d, dict) else None
    return v.strip() if isinstance(v, str) else ""


def _line(d: Any, key: str) -> str:
    """A text field written to the URL list and CREDITS.md (licence, its URL, the source page): one visible line."""
    return printable(" ".join(_text(d, key).split()))


def _list(d: Any, key: str, where: str) -> list[Any]:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, list):
        raise AnswerError(f"not the documented shape: expected a list at {where!r}, got {type(v).__name__}")
    return v


class Provider:
    """The interface: name, base_url, page_size, key_env; ``request`` and ``parse``; the cursor of the first page."""

    name: ClassVar[str] = ""
    base_url: ClassVar[str] = ""
    page_size: ClassVar[int] = 20
    first: ClassVar[Any] = 1
    key_env: ClassVar[str | None] = None  # the variable holding a user's key (token)
    key_required: ClassVar[bool] = False
    about: ClassVar[str] = ""
    serves: ClassVar[frozenset[str] | None] = None  # the only licence codes its pictures are under (None: any)

    @property
    def endpoint_env(self) -> str:
        """The environment variable that points this provider at another base URL (a mirror, a local fake)."""
        return f"URSA_{self.name.upper()}_ENDPOINT"

    def key(self) -> str:
        """The user's key from the environment, or ""."""
        return os.environ.get(self.key_env, "").strip() if self.key_env else ""

    def request(self, base: str, query: str, cursor: Any, licenses: frozenset[str]) -> tuple[str, dict[str, str]]:
        """The URL (base + query string) and the headers asking for the page at ``cursor``."""
        raise NotImplementedError

    def parse(self, body: Any, cursor: Any) -> Page:
        """One page from the decoded JSON answer; AnswerError when it is not the documented shape."""
        raise NotImplementedError


class Openverse(Provider):
    """Openverse's image search (openly licensed images, keyless; a token raises the limits)."""

    name = "openverse"
    base_url = "https://api.openverse.org/v1/images/"
    key_env = "OPENVERSE_TOKEN"
    about = "Openverse (openly licensed images from Flickr, museums, Wikimedia...); OPENVERSE_TOKEN raises its limits"
    KNOWN = frozenset({"cc0", "pdm", "by", "by-sa", "by-nd", "by-nc", "by-nc-sa", "by-nc-nd"})
    serves = KNOWN
    NAMES = {"cc0": "CC0", "pdm": "Public Domain Mark"}  # the others: "by-sa" + "4.0" -> "CC BY-SA 4.0"

    def request(self, base: str, query: str, cursor: Any, licenses: frozenset[str]) -> tuple[str, dict[str, str]]:
        params = {"q": query, "page": cursor, "page_size": self.page_size}
        if licenses and licenses <= self.KNOWN:  # asked of the API too; other codes are filtered here only
            params["license"] = ",".join(sorted(licenses))
        token = self.key()
        return f"{base}?{urlencode(params)}", ({"Authorization": f"Bearer {token}"} if token else {})

    def parse(self, body: Any, cursor: Any) -> Page:
        results = []
        for r in _list(body, "results", "results"):
            if not isinstance(r, dict):
                continue
            code, version = _line(r, "license"), _line(r, "license_version")
            label = f"{self.NAMES.get(code, 'CC ' + code.upper())} {version}".strip() if code else ""
            results.append(Found(_text(r, "url"), _line(r, "foreign_landing_url"), plain_text(r.get("creator")),
                                 label, _line(r, "license_url"), self.name))
        pages = body.get("page_count")
        last = not results or (isinstance(pages, int) and cursor >= pages)
        return Page(results, None if last else cursor + 1)


class Commons(Provider):
    """Wikimedia Commons' MediaWiki API: full-text search of File: pages with each file's licence (keyless)."""

    name = "commons"
    base_url = "https://commons.wikimedia.org/w/api.php"
    page_size = 50
    first = 0
    about = "Wikimedia Commons (every file with its licence and author)"
    THUMB = 1024  # ask for a thumbnail this wide: what download keeps anyway, a fraction of the bytes

    def request(self, base: str, query: str, cursor: Any, licenses: frozenset[str]) -> tuple[str, dict[str, str]]:
        params = {
            "action": "query", "format": "json", "formatversion": 2, "generator": "search",
            "gsrsearch": f"filetype:bitmap {query}", "gsrnamespace": 6, "gsrlimit": self.page_size,
            "gsroffset": cursor, "prop": "imageinfo", "iiprop": "url|mime|extmetadata",
            "iiurlwidth": self.THUMB, "iiextmetadatafilter": "Artist|LicenseShortName|LicenseUrl",
        }
        return f"{base}?{urlencode(params)}", {}

    def parse(self, body: Any, cursor: Any) -> Page:
        if not isinstance(body, dict):
            raise AnswerError(f"not the documented shape: expected an object, got {type(body).__name__}")
        if isinstance(body.get("error"), dict):  # MediaWiki reports failures in the body, with HTTP 200
            e = body["error"]
            raise AnswerError(f"the API said {_text(e, 'code') or 'error'}: {plain_text(e.get('info'))[:160]}")
        query = body.get("query", {})  # no "query" at all: the search found nothing
        pages = sorted((p for p in _list(query, "pages", "query.pages") if isinstance(p, dict)) if query else [],
                       key=lambda p: p.get("index", 0) if isinstance(p.get("index"), int) else 0)
        results = []
        for p in pages:
            info = p.get("imageinfo")
            if not isinstance(info, list) or not info or not isinstance(info[0], dict):
                continue
            ii = info[0]
            if not _text(ii, "mime").startswith("image/"):
                continue
            meta = ii.get("extmetadata") if isinstance(ii.get("extmetadata"), dict) else {}

            def value(key: str) -> str:
                return plain_text(meta.get(key, {}).get("value")) if isinstance(meta.get(key), dict) else ""

            results.append(Found(_text(ii, "thumburl") or _text(ii, "url"), _line(ii, "descriptionurl"),
                                 value("Artist"), value("LicenseShortName"), value("LicenseUrl"), self.name))
        more = body.get("continue")
        nxt = more.get("gsroffset") if isinstance(more, dict) else None
        return Page(results, nxt if isinstance(nxt, int) and nxt > cursor else None)


class Pexels(Provider):
    """Pexels' photo search: needs a free API key in PEXELS_API_KEY; every photo is under the Pexels License."""

    name = "pexels"
    base_url = "https://api.pexels.com/v1/search"
    page_size = 80
    key_env = "PEXELS_API_KEY"
    key_required = True
    about = "Pexels (stock photos, Pexels License); needs PEXELS_API_KEY"
    LICENSE = ("Pexels License", "https://www.pexels.com/license/")
    serves = frozenset({"pexels-license"})

    def request(self, base: str, query: str, cursor: Any, licenses: frozenset[str]) -> tuple[str, dict[str, str]]:
        params = {"query": query, "per_page": self.page_size, "page": cursor}
        return f"{base}?{urlencode(params)}", {"Authorization": self.key()}

    def parse(self, body: Any, cursor: Any) -> Page:
        results = []
        for p in _list(body, "photos", "photos"):
            src = p.get("src") if isinstance(p, dict) else None
            if not isinstance(src, dict):
                continue
            url = _text(src, "large2x") or _text(src, "large") or _text(src, "original")
            results.append(Found(url, _line(p, "url"), plain_text(p.get("photographer")), *self.LICENSE, self.name))
        return Page(results, cursor + 1 if results and _text(body, "next_page") else None)


PROVIDERS: dict[str, Provider] = {p.name: p for p in (Openverse(), Commons(), Pexels())}
DEFAULT_PROVIDERS = ("openverse", "commons")  # the keyless ones; a keyed one is used when named


def get_provider(name: str) -> Provider:
    """A provider by its ``--provider`` name, or one line listing the names there are."""
    found = PROVIDERS.get(name.strip().lower())
    if found is None:
        raise SearchError(f"--provider {name!r}: unknown; expected one of {', '.join(PROVIDERS)}")
    return found
