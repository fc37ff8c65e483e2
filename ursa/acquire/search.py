"""`ursa search`: image-search results with their licences, written as a URL list `ursa download` reads.

Each provider (``providers.PROVIDERS``) is paged through concurrently until it has given ``n``
usable results, has no more pages, or fails. Every API call goes through download's fetch
(``fetch.fetch``: retries with backoff on timeouts, 429 honouring Retry-After, 5xx, a deadline
and a size cap) over the address rule (``addresses``); every result URL is checked by the same
rule before it is kept, and one pointing at this machine, a private network or a metadata
address is dropped and counted. A provider that fails (an error status after its retries, a body
that is not JSON or not the documented shape) ends its own paging with a reason; the results it
gave before and every other provider's are kept. The results are interleaved across providers,
de-duplicated by picture (``picture_key``) and written to ``urls_<class>.csv`` (``url``, then the
credit columns), once, atomically, under a lock that refuses a second search of the same list.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ursa.acquire.addresses import AddressPolicy, AddressRefused, GuardedTransport, url_refusal
from ursa.acquire.fetch import FetchOptions, check_redirect, fetch, one_line
from ursa.acquire.licenses import license_allowed, parse_license_filter
from ursa.acquire.providers import (
    DEFAULT_PROVIDERS, PROVIDERS, AnswerError, Found, Provider, SearchError, get_provider,
)
from ursa.acquire.urls import SEARCH_COLUMNS, check_class_name, redacted, url_problem
from ursa.errors import WriteError
from ursa.util.files import atomic_write_csv, csv_row_values
from ursa.util.lock import FolderLock
from ursa.util.progress import progress_bar

MAX_PAGES = 50  # per provider and search: a provider that keeps answering nothing usable stops here
DROPS = ("license", "address", "bad_url", "duplicate")  # why a result was not kept, in the summary's order


@dataclass
class ProviderRun:
    """What one provider gave: pages asked, results found and kept, why others were dropped, how it ended."""

    name: str
    endpoint: str
    pages: int = 0
    found: int = 0
    kept: list[Found] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    error: str = ""  # why paging stopped early ("" when it ran out of pages or reached n)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"provider": self.name, "endpoint": redacted(self.endpoint), "pages": self.pages, "found": self.found,
                "kept": len(self.kept), "dropped": dict(self.dropped), "error": self.error}


@dataclass
class SearchSummary:
    """The whole search: the query, each provider's run, the results written and where."""

    query: str
    cls: str
    out: Path
    runs: list[ProviderRun]
    results: list[Found]
    total: int = 0  # rows in the file: an earlier search's rows are kept, the new ones added after them
    interrupted: bool = False  # Ctrl-C stopped the search: the results found until then were written

    @property
    def dropped_address(self) -> int:
        """Results dropped for pointing at this machine, a private network or a metadata address."""
        return sum(r.dropped["address"] for r in self.runs)

    def to_json(self) -> str:
        """The summary as JSON text, for --json."""
        return json.dumps(self.to_dict(), indent=2)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"query": self.query, "class": self.cls, "out": str(self.out), "results": len(self.results),
                "total": self.total, "interrupted": self.interrupted, "dropped_address": self.dropped_address,
                "providers": [r.to_dict() for r in self.runs]}

    def format(self) -> str:
        """The closing summary: one line per provider, what was written, what to run next."""
        width = max(8, *(len(r.name) for r in self.runs))
        lines = [f"Searched {len(self.runs)} provider(s) for {self.query!r} (class {self.cls})", "",
                 f"  {'provider':<{width}}  {'pages':>5}  {'found':>5}  {'kept':>5}  dropped"]
        for r in self.runs:
            why = ", ".join(f"{n} {k}" for k, n in ((k, r.dropped[k]) for k in DROPS) if n) or "-"
            lines.append(f"  {r.name:<{width}}  {r.pages:>5}  {r.found:>5}  {len(r.kept):>5}  {why}")
            if r.error:
                lines.append(f"  {'':<{width}}  stopped: {r.error}")
        if self.dropped_address:
            lines.append(f"\n{self.dropped_address} result(s) dropped: they point at this machine, a private network "
                         "or a cloud metadata address.")
        if self.interrupted:
            lines.append("\nInterrupted (Ctrl-C): the results found until then are kept; run the same command again "
                         "to go on.")
        if not self.results:
            lines.append(f"\nNo usable result: {self.out} was not written." if not self.total else
                         f"\nNo new result: {self.out} keeps its {self.total} URLs.")
        else:
            lines.append(f"\nWrote {len(self.results)} new URLs to {self.out} ({self.total} in all); next: "
                         f"ursa download {self.out} --dest DATA")
        return "\n".join(lines)


def _endpoints(names: list[str], endpoint: str | Iterable[str] | None) -> dict[str, str]:
    """--endpoint URL (one provider) or NAME=URL (any), over URSA_<NAME>_ENDPOINT, over the provider's own URL."""
    out = {}
    for n in names:
        p = get_provider(n)
        out[p.name] = os.environ.get(p.endpoint_env, "").strip() or p.base_url
    given = [endpoint] if isinstance(endpoint, str) else list(endpoint or [])
    for e in given:
        name, eq, url = e.partition("=")
        if eq and name.strip().lower() in out and "://" not in name:
            out[name.strip().lower()] = url.strip()
        elif len(out) == 1:
            out[next(iter(out))] = e.strip()
        else:
            raise SearchError(f"--endpoint {e!r}: with several providers write NAME=URL (e.g. commons=http://...)")
    for name, url in out.items():
        problem = url_problem(url)
        if problem is not None:
            raise SearchError(f"endpoint of {name} {redacted(url)!r}: {redacted(problem[1])}")
    return out


CONTACT_ENV = "URSA_CONTACT"  # the operator's e-mail or web page, sent in the User-Agent as Wikimedia's policy asks


def user_agent() -> str:
    """``ursa/VERSION (CONTACT; image classifier course tool) httpx/VERSION``: the form Wikimedia's User-Agent policy
    asks of API clients (a name, a version, a way to reach whoever runs it, from URSA_CONTACT)."""
    import httpx

    from ursa import __version__

    contact = " ".join(os.environ.get(CONTACT_ENV, "").encode("ascii", "ignore").decode().split())
    contact = "".join(c for c in contact if c.isprintable() and c not in "()")  # a header holds printable ASCII
    about = f"{contact}; " if contact else ""
    return f"ursa/{__version__} ({about}image classifier course tool) httpx/{httpx.__version__}"


def _client(provider: Provider, policy: AddressPolicy, timeout: float, headers: Mapping[str, str]) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(follow_redirects=True, max_redirects=5, timeout=httpx.Timeout(timeout, pool=None),
                             trust_env=False, transport=GuardedTransport(policy, limits=limits),
                             headers={"User-Agent": user_agent(), "Accept": "application/json", **headers},
                             event_hooks={"response": [check_redirect]})  # a malformed redirect: bad_url, not retried


async def _page_through(run: ProviderRun, provider: Provider, query: str, n: int, licenses: frozenset[str],
                        opt: FetchOptions, policy: AddressPolicy, seen: set[str],
                        hosts: dict[str, AddressRefused | None], max_pages: int,
                        kept: Callable[[int], None]) -> ProviderRun:
    """One provider's pages into ``run`` until it gave n usable results, ran out, failed, or max_pages (each page's
    results are in ``run.kept`` once the page is done, so Ctrl-C keeps them); ``kept(k)`` after each page."""
    base = run.endpoint
    cursor = provider.first
    client = None
    given: set[str] = set()  # every URL this provider answered, kept or not
    if licenses and provider.serves is not None and not licenses & provider.serves:
        run.error = f"not asked: none of its licences ({', '.join(sorted(provider.serves))}) is in --license"
        return run  # else it would be paged max_pages deep for nothing (Pexels allows 200 calls an hour)
    try:
        while cursor is not None and len(run.kept) < n and run.pages < max_pages:
            url, headers = provider.request(base, query, cursor, licenses)
            if client is None:
                client = _client(provider, policy, opt.timeout, headers)
            got = await fetch(client, url, asyncio.Semaphore(1), opt)
            run.pages += 1
            if got.data is None:
                run.error = f"{got.kind}: {one_line(redacted(got.detail), 160)}"
                break
            try:
                body = json.loads(got.data)
            except (ValueError, UnicodeDecodeError) as e:
                run.error = f"malformed answer: not JSON ({one_line(e, 80)})"
                break
            except RecursionError:  # "[[[[..." a million deep: a hostile or broken answer, not a bug of ursa
                run.error = "malformed answer: JSON nested too deeply to be a search answer"
                break
            try:
                page = provider.parse(body, cursor)
            except AnswerError as e:
                run.error = one_line(e, 200)
                break
            except (AttributeError, TypeError, KeyError) as e:  # a shape parse did not foresee
                run.error = f"not the documented shape ({type(e).__name__}: {one_line(e, 120)})"
                break
            if page.results and all(f.url in given for f in page.results):  # the same page again and again
                run.error = f"page {run.pages} repeated results this provider had given already; paging stopped"
                break
            given.update(f.url for f in page.results)
            for found in page.results:
                run.found += 1
                why = _drop_reason(found, licenses, seen)
                if why is None and await url_refusal(found.url, policy, hosts, opt.timeout) is not None:
                    why = "address"
                if why is None and picture_key(found.url) in seen:  # another provider kept it while this one waited
                    why = "duplicate"
                if why:
                    run.dropped[why] += 1
                    continue
                seen.add(picture_key(found.url))
                run.kept.append(found)
            kept(len(run.kept))
            cursor = page.next
    except asyncio.CancelledError:  # Ctrl-C while this provider was still paging
        run.error = run.error or "interrupted (Ctrl-C)"
        raise
    except Exception as e:  # noqa: BLE001 - whatever goes wrong with one provider never loses the others' results
        run.error = f"unexpected: {type(e).__name__}: {one_line(redacted(str(e)), 160)} (please report it)"
    finally:
        if client is not None:
            await client.aclose()
    return run


# A Wikimedia file and its thumbnails: .../wikipedia/commons/a/ab/Bear.jpg and .../commons/thumb/a/ab/Bear.jpg/1024px-Bear.jpg
_WIKIMEDIA_FILE = re.compile(r"^(https?://[^/]+/wikipedia/[^/]+/)(?:thumb/)?([0-9a-f]/[0-9a-f]{2}/[^/?#]+)", re.I)


def picture_key(url: str) -> str:
    """What makes two result URLs the same picture: the URL, except that a Wikimedia file and its thumbnails are one
    (Openverse indexes Commons too, giving the original where Commons gives the 1024 px rendering)."""
    m = _WIKIMEDIA_FILE.match(url)
    return (m.group(1) + m.group(2)).lower() if m else url


def _drop_reason(found: Found, licenses: frozenset[str], seen: set[str]) -> str | None:
    if not found.url or url_problem(found.url) is not None:
        return "bad_url"
    if picture_key(found.url) in seen:
        return "duplicate"
    if not license_allowed(licenses, found.license, found.license_url):
        return "license"
    return None


def interleave(runs: list[ProviderRun], n: int) -> list[Found]:
    """Round-robin over the providers' kept results (each in its rank order), first n."""
    out: list[Found] = []
    for i in range(max((len(r.kept) for r in runs), default=0)):
        out += [r.kept[i] for r in runs if i < len(r.kept)]
    return out[:n]


def _existing_rows(out: Path, header_only: bool = False) -> list[list[str]]:
    """Rows of a URL list an earlier search wrote (kept first); a file ursa did not write is refused, not rewritten."""
    import csv

    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_file():  # a folder, a device (/dev/full reads forever), a FIFO, a dangling link
        raise SearchError(f"{out}: exists and is not a file (a folder, a device or a broken link); give --out a "
                          "file name such as urls_CLASS.csv")
    with open(out, "rb") as f:
        header = f.readline(4096).decode("utf-8-sig", errors="replace").rstrip("\r\n")  # the header alone first
        if not header or tuple(next(csv.reader([header]))) != SEARCH_COLUMNS:
            raise SearchError(f"{out}: exists and was not written by `ursa search`; move it away or give another --out")
        if header_only:
            return []
        text = f.read().decode("utf-8", errors="replace").splitlines()
    return [csv_row_values(row[: len(SEARCH_COLUMNS)]) + [""] * (len(SEARCH_COLUMNS) - len(row))
            for row in csv.reader(text) if row and row[0]]


def search_images(query: str, cls: str | None = None, n: int = 200, *, providers: Iterable[str] | None = None,
                  endpoint: str | Iterable[str] | None = None, licenses: str | Iterable[str] | None = None,
                  out: str | Path | None = None, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                  max_retry_after: float = 30.0, allow_private: bool = False,
                  address_policy: AddressPolicy | None = None, max_pages: int = MAX_PAGES,
                  progress: bool = False) -> SearchSummary:
    """Search every provider for ``query`` and write up to ``n`` results to ``out`` (default ``urls_<cls>.csv``).

    ``n`` counts the whole list: a file an earlier search wrote keeps its rows and gets at most ``n`` minus those.
    ``cls``: the class the list is for (default: the query with spaces as underscores).
    ``providers``: names from ``providers.PROVIDERS`` (default the keyless ones). ``endpoint``: another base URL,
    ``URL`` for a single provider or ``NAME=URL``. ``licenses``: keep only these codes (``"cc0,by"``).
    ``allow_private`` / ``address_policy``: as for ``download_images``, for the API calls and the result URLs.
    ``progress``: a bar of results kept (on stderr, on a terminal only).
    """
    query = " ".join(str(query).split())
    if not query:
        raise SearchError("no search words given; e.g. ursa search \"grizzly bear\" --class grizzly")
    cls = check_class_name(cls if cls else query.replace(" ", "_"), cls or query)
    if n < 1 or timeout <= 0 or retries < 0:
        raise SearchError(f"expected -n of at least 1, a positive --timeout and --retries of 0 or more, got "
                          f"{n}, {timeout:g}, {retries}")
    given = [providers] if isinstance(providers, str) else list(providers or DEFAULT_PROVIDERS)
    names = list(dict.fromkeys(p.strip().lower() for s in given for p in str(s).split(",") if p.strip()))
    if not names:
        raise SearchError(f"--provider: no provider named; expected one of {', '.join(PROVIDERS)}")
    bases = _endpoints(names, endpoint)
    for name in names:
        p = get_provider(name)
        if p.key_required and not p.key():
            raise SearchError(f"--provider {name}: needs a key in the environment variable {p.key_env}")
    codes = parse_license_filter(licenses)
    out = Path(out) if out is not None else Path(f"urls_{cls}.csv")
    _existing_rows(out, header_only=True)  # a folder, a device or a user's file: refused before any lock file is made
    # One search per list at a time: two would each read the list, then the last to write would drop the other's rows.
    with FolderLock(out.parent, f".{out.name}.lock", "folder of the URL list"):
        earlier = _existing_rows(out)
        policy = address_policy if address_policy is not None else AddressPolicy(allow_private=allow_private)
        opt = FetchOptions(timeout=float(timeout), deadline=6.0 * float(timeout), retries=retries, backoff=backoff,
                           max_retry_after=max_retry_after, max_bytes=20 * 1024 * 1024, max_size=0, max_pixels=0)

        want = max(0, n - len(earlier))  # -n counts the whole list: a second search with a higher -n continues it

        bar = progress_bar(quiet=not progress or not want, unit="results")
        task = bar.add_task(f"searching {', '.join(names)}", total=want * len(names))
        done = dict.fromkeys(names, 0)

        def kept(name: str) -> Callable[[int], None]:
            def update(k: int) -> None:
                done[name] = min(k, want)
                bar.update(task, completed=sum(done.values()))
            return update

        runs = [ProviderRun(name, bases[name]) for name in names]

        async def run_all() -> None:
            seen: set[str] = {picture_key(row[0]) for row in earlier}
            hosts: dict[str, AddressRefused | None] = {}
            await asyncio.gather(*(_page_through(run, get_provider(run.name), query, want, codes, opt, policy, seen,
                                                 hosts, max_pages, kept(run.name)) for run in runs))

        interrupted = False
        try:
            with bar:
                asyncio.run(run_all())
        except KeyboardInterrupt:  # Ctrl-C: the pages done so far are written, and the summary says it stopped
            interrupted = True
        results = interleave(runs, want)
        rows = earlier + [f.row() for f in results]
        if results:
            try:
                atomic_write_csv(out, SEARCH_COLUMNS, rows)
            except OSError as e:  # a full disk is NoSpaceError already; a read-only file system, a permission
                raise WriteError(f"{out}: cannot write the URL list ({e.strerror or e}); give --out a file in a "
                                 "folder you can write to") from None
        return SearchSummary(query, cls, out, runs, results, total=len(rows) if results else len(earlier),
                             interrupted=interrupted)
