"""Download the images behind per-class URL lists, so a user never has to guess what happened.

The lesson saves image-search URLs into ``urls_<class>.txt`` files and downloads them. Here:

* every URL ends up as exactly one row of ``DEST/downloads.csv`` (saved, duplicate, failed or
  refused, with the HTTP status and a reason), appended as it completes, so a killed run
  loses nothing and a second run resumes where the first stopped;
* images land in ``DEST/<class>/00000000.jpg``... written to a temporary name and renamed, so
  there is never a partial image; the extension is the real format sniffed from the bytes
  (``.jpg``, ``.png``, ``.gif``, ``.webp``...), or ``.jpg`` when the image was shrunk;
* the type is decided from the bytes and a decode of every byte (``ursa.vision.images.open_image``,
  at reduced size, within a memory budget), never from the Content-Type header: an HTML page is a
  failure, not a file;
* only public addresses are fetched (after DNS, on every redirect hop; ``allow_private`` opens
  this machine and the local network), and a malformed URL line is one failed row, not a crash;
* fetching is concurrent (asyncio + httpx) and polite: at most ``per_host`` requests to one
  host at a time, retries with backoff on timeouts, 429 (honouring Retry-After, capped) and
  5xx, a size cap checked while streaming, and a deadline per URL;
* identical content within a class is stored once (sha256) and recorded as ``duplicate``.

Failed URLs, and URLs refused for their address, are tried again on the next run
(``retry_failed=False`` keeps them as they are); saved, duplicate and other refused URLs are never
fetched again.

This module is the run (host pool, order, resume, lock); ``urls`` reads the lists, ``fetch``
gets and checks one URL, ``manifest`` records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

from ursa.acquire.addresses import AddressPolicy
from ursa.acquire.licenses import license_allowed, parse_license_filter
from ursa.acquire.fetch import (
    FetchOptions, HostPool, MemoryBudget, decode_blocks, fetch, inspect_image, one_line, prepare_image,
)
from ursa.acquire.manifest import (
    DONE_STATUSES, MANIFEST_NAME, DownloadSummary, ManifestWriter, is_legacy, read_manifest,
)
from ursa.acquire.urls import Credit, DownloadError, read_url_sources, redacted, url_problem
from ursa.errors import ImageError
from ursa.util.files import atomic_write_bytes
from ursa.util.numbers import parse_bytes
from ursa.util.progress import progress_bar
from ursa.vision.images import MAX_PIXELS

_NAME_RE = re.compile(r"(\d{8})\.[A-Za-z0-9]+")


@dataclass
class _ClassState:
    saved: int
    next_index: int
    hashes: dict[str, str]  # sha256 of downloaded bytes -> file (relative to dest)
    orphans: dict[str, str]  # sha256 of file bytes -> file, for files a killed run left unrecorded
    inflight: int = 0
    cond: asyncio.Condition | None = None


def _is_leftover_temp(name: str) -> bool:
    """A temporary file a killed run left: any ``.*.part`` (older runs), or ``.00000007.jpg.<random>.tmp``."""
    if not name.startswith("."):
        return False
    return name.endswith(".part") or (name.endswith(".tmp") and _NAME_RE.match(name[1:]) is not None)


def _interleave_by_host(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Round-robin over hosts so the per-host limit never idles the workers while others wait."""
    groups: dict[str, deque[tuple[str, str]]] = {}
    for item in items:
        groups.setdefault(urlsplit(item[1]).netloc.lower(), deque()).append(item)
    out: list[tuple[str, str]] = []
    queues = list(groups.values())
    while queues:
        for q in queues:
            out.append(q.popleft())
        queues = [q for q in queues if q]
    return out


def _scan_class(dest: Path, cls: str, rows: list[dict[str, str]]) -> _ClassState:
    """Rebuild a class's state from its manifest rows and folder; clean what a killed run left."""
    folder = dest / cls
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*"):
        if _is_leftover_temp(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
    indexes = [-1]
    recorded: set[str] = set()
    hashes: dict[str, str] = {}
    saved = 0
    for r in rows:
        if r["class"] != cls or not r["file"]:
            continue
        m = _NAME_RE.fullmatch(Path(r["file"]).name)
        if m:
            indexes.append(int(m.group(1)))
        if r["status"] == "saved":
            recorded.add(r["file"])
            if r["sha256"]:
                hashes.setdefault(r["sha256"], r["file"])
            if (dest / r["file"]).exists():
                saved += 1
    orphans: dict[str, str] = {}
    for f in folder.iterdir():
        m = _NAME_RE.fullmatch(f.name)
        if not m or not f.is_file():
            continue
        indexes.append(int(m.group(1)))
        rel = f"{cls}/{f.name}"
        if rel not in recorded:
            orphans.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), rel)
    return _ClassState(saved, max(indexes) + 1, hashes, orphans)


async def _run(
    items: list[tuple[str, str]],
    states: dict[str, _ClassState],
    dest: Path,
    writer: ManifestWriter,
    summary: DownloadSummary,
    opt: FetchOptions,
    workers: int,
    per_host: int,
    max_pics: int,
    progress: Any,
    policy: AddressPolicy,
    credits: Mapping[tuple[str, str], Credit],
) -> None:
    for st in states.values():
        st.cond = asyncio.Condition()
    hosts = HostPool(per_host, opt.timeout, policy)
    budget = MemoryBudget(opt.decode_memory)
    queue = deque(_interleave_by_host(items))
    task_id = progress.add_task("downloading", total=len(queue)) if progress else None

    def record(cls: str, url: str, status: str, *, file: str = "", http_status: int | None = None,
               kind: str | None = None, detail: str = "", nbytes: int | None = None, sha: str = "",
               by_rule: bool = False) -> None:
        error = f"{kind}: {one_line(detail)}" if kind else ""
        writer.write({"url": url, "class": cls, "file": file, "status": status, "http_status": http_status,
                      "error": error, "bytes": nbytes, "sha256": sha, **credits.get((cls, url), {})})
        summary.add(cls, status, kind if status == "failed" else None)
        if status == "refused" and by_rule:  # the address rule's verdict, not the message's wording
            summary.refused_address += 1

    def advance() -> None:
        if progress:
            progress.update(
                task_id, advance=1,
                description=f"saved {summary.saved} · dup {summary.duplicate} · failed {summary.failed}",
            )

    async def handle(cls: str, url: str) -> None:
        st = states[cls]
        assert st.cond is not None
        if max_pics:
            async with st.cond:
                await st.cond.wait_for(lambda: st.saved + st.inflight < max_pics or st.inflight == 0)
                if st.saved >= max_pics:
                    summary.over_cap += 1
                    return
                st.inflight += 1
        try:
            client, sem = hosts.get(url)
            got = await fetch(client, url, sem, opt)
            if got.data is None:
                status = "refused" if got.kind == "refused" else "failed"
                record(cls, url, status, http_status=got.http_status, kind=got.kind, detail=got.detail,
                       by_rule=got.by_rule)
                return
            n = len(got.data)
            try:
                head = await asyncio.to_thread(inspect_image, got.data, got.content_type, opt)
                if head.sha256 in st.hashes:  # known content: no need to decode it again
                    record(cls, url, "duplicate", file=st.hashes[head.sha256], http_status=got.http_status,
                           nbytes=n, sha=head.sha256)
                    return
                async with budget.hold(head.cost):  # decodes together only while they fit in memory
                    prep = await asyncio.to_thread(prepare_image, got.data, got.content_type, opt, head.sha256)
            except ImageError as e:
                record(cls, url, "failed", http_status=got.http_status, kind=e.kind, detail=e.reason, nbytes=n)
                return
            if prep.sha256 in st.hashes:
                record(cls, url, "duplicate", file=st.hashes[prep.sha256], http_status=got.http_status,
                       nbytes=n, sha=prep.sha256)
                return
            if max_pics and st.saved >= max_pics:
                summary.over_cap += 1
                return
            adopted = st.orphans.pop(prep.file_sha256, None)
            if adopted:  # a killed run wrote this file but not its row: claim it, write nothing
                st.hashes[prep.sha256] = adopted
                st.saved += 1
                record(cls, url, "saved", file=adopted, http_status=got.http_status, nbytes=n, sha=prep.sha256)
                return
            rel = f"{cls}/{st.next_index:08d}{prep.ext}"
            st.next_index += 1
            st.hashes[prep.sha256] = rel
            st.saved += 1
            try:
                await asyncio.to_thread(atomic_write_bytes, dest / rel, prep.out)
            except OSError as e:
                st.hashes.pop(prep.sha256, None)
                st.saved -= 1
                record(cls, url, "failed", http_status=got.http_status, kind="write", detail=f"{rel}: {e}",
                       nbytes=n)
                return
            record(cls, url, "saved", file=rel, http_status=got.http_status, nbytes=n, sha=prep.sha256)
        finally:
            if max_pics:
                async with st.cond:
                    st.inflight -= 1
                    st.cond.notify_all()

    async def worker() -> None:
        while queue:
            cls, url = queue.popleft()
            try:
                await handle(cls, url)
            except Exception as e:  # one bad URL never stops the run
                record(cls, url, "failed", kind="unexpected", detail=f"{type(e).__name__}: {e}")
            advance()

    try:
        await asyncio.gather(*(worker() for _ in range(min(workers, max(1, len(queue))))))
    finally:
        await hosts.aclose()


def _retry_row(row: Mapping[str, str]) -> bool:
    """Whether a row's URL is worth another try: it failed, or it was refused though the URL itself is fine (so its
    address was: the rule or --allow-private may let it through now; checking again sends nothing)."""
    return row["status"] == "failed" or (row["status"] == "refused" and url_problem(row["url"]) is None)


def _plan_resume(
    manifest: Path, lists: Mapping[str, list[str]], retry_failed: bool, credits: Mapping[tuple[str, str], Credit]
) -> tuple[list[dict[str, str]], bool]:
    """Rows to keep from an earlier run (one per URL; those to try again dropped; empty credits filled from the lists)
    and whether to rewrite the manifest."""
    latest: dict[tuple[str, str], dict[str, str]] = {}
    old_rows = read_manifest(manifest)
    for r in old_rows:
        key = (r["class"], r["url"])
        if key in latest and latest[key]["status"] in DONE_STATUSES and r["status"] == "failed":
            continue  # a finished row is never replaced by a failed one
        latest[key] = r
    wanted = {(cls, redacted(u)) for cls, urls in lists.items() for u in urls}  # as the manifest holds them
    keep = [r for k, r in latest.items() if not (retry_failed and _retry_row(r) and k in wanted)]
    fills = [(r, {c: v for c, v in credits.get((r["class"], r["url"]), {}).items() if not r.get(c)}) for r in keep]
    for r, new in fills:
        r.update(new)
    torn = manifest.exists() and manifest.stat().st_size > 0 and not manifest.read_bytes().endswith(b"\n")
    return keep, len(keep) != len(old_rows) or torn or any(new for _, new in fills) or is_legacy(manifest)


@contextlib.contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
    """One download per folder at a time: two runs would number and de-duplicate files independently."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    fd = os.open(dest / ".downloads.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(
                f"{dest}: another ursa download is writing there; wait for it to finish or choose another --dest"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock; a killed run's lock goes with its process


def download_images(
    url_files: Mapping[str, Any] | Iterable[str | Path],
    dest: str | Path,
    *,
    max_pics: int = 200,
    workers: int = 16,
    timeout: float = 10.0,
    max_size: int = 1024,
    max_bytes: int | str = "20MB",
    per_host: int = 4,
    retries: int = 3,
    backoff: float = 0.5,
    max_retry_after: float = 30.0,
    deadline: float | None = None,
    retry_failed: bool = True,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
    allow_private: bool = False,
    decode_memory: int | str = "512MB",
    address_policy: AddressPolicy | None = None,
    licenses: str | Iterable[str] | None = None,
) -> DownloadSummary:
    """Download every URL of every class into ``dest/<class>/`` and account for each one in downloads.csv.

    ``url_files``: ``{class: file or [urls]}``, or a list of ``CLASS=FILE`` / ``urls_<class>.txt``.
    ``max_pics``: most images saved per class (0 = no cap). ``max_size``: shrink the long side to
    this (0 = keep). ``deadline``: most seconds spent on one URL, retries included (default 6 x
    ``timeout``). Failed URLs of an earlier run are retried unless ``retry_failed`` is False.
    ``allow_private``: also fetch from this machine and private networks (loopback, 10/8,
    192.168/16, link-local...); metadata, unspecified and multicast addresses stay refused.
    ``decode_memory``: the memory decodes in flight may use together (one bigger image runs alone).
    ``address_policy``: the address rule in full (allowed networks, a resolver); overrides ``allow_private``.
    ``licenses``: fetch only URLs whose list gives one of these licences (``"cc0,by"``); the others are not recorded.
    """
    lists, credits = read_url_sources(url_files)
    codes = parse_license_filter(licenses)
    max_bytes = parse_bytes(max_bytes)
    decode_memory = parse_bytes(decode_memory, "decode_memory")
    policy = address_policy if address_policy is not None else AddressPolicy(allow_private=allow_private)
    for name, value, low in (("--workers", workers, 1), ("--per-host", per_host, 1), ("--max-pics", max_pics, 0),
                             ("--max-size", max_size, 0), ("--retries", retries, 0)):
        if value < low:
            raise DownloadError(f"{name} {value}: must be at least {low}")
    if timeout <= 0 or (deadline is not None and deadline <= 0):
        raise DownloadError("--timeout and --deadline must be positive numbers of seconds")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest}: exists and is not a folder; choose another --dest")
    manifest = dest / MANIFEST_NAME
    if dest.is_dir() and not dest.stat().st_mode & 0o222:  # a read-only mark, honoured even as root
        raise DownloadError(f"{dest}: the folder is read-only; choose another --dest")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        probe = dest / f".ursa-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DownloadError(f"{dest}: cannot write there ({e.strerror or e}); choose another --dest") from None

    with _dest_lock(dest):
        keep, rewrite = _plan_resume(manifest, lists, retry_failed, credits)
        done = {(r["class"], r["url"]) for r in keep}
        summary = DownloadSummary(dest=dest, manifest=manifest)
        for cls in lists:
            summary.per_class.setdefault(cls, Counter())
        states = {cls: _scan_class(dest, cls, keep) for cls in lists}
        opt = FetchOptions(
            timeout=float(timeout),
            deadline=float(deadline) if deadline else 6.0 * float(timeout),
            retries=retries,
            backoff=backoff,
            max_retry_after=max_retry_after,
            max_bytes=max_bytes,
            max_size=max_size,
            max_pixels=max_pixels,
            decode_memory=decode_memory,
        )
        started = time.perf_counter()
        writer = ManifestWriter(manifest, keep, rewrite)
        items: list[tuple[str, str]] = []
        try:
            for cls, urls in lists.items():
                for url in urls:
                    if (cls, redacted(url)) in done:
                        summary.skipped += 1
                        summary.per_class[cls]["skipped"] += 1
                        continue
                    credit = credits.get((cls, url), {})
                    if not license_allowed(codes, credit.get("license", ""), credit.get("license_url", "")):
                        summary.filtered += 1
                        continue
                    problem = url_problem(url)
                    if problem is not None:  # a refused scheme or a malformed line: one row, the run goes on
                        status, reason = problem
                        kind = "refused" if status == "refused" else "bad_url"
                        writer.write({"url": url, "class": cls, "file": "", "status": status, "http_status": "",
                                      "error": f"{kind}: {one_line(reason)}", "bytes": "", "sha256": "", **credit})
                        summary.add(cls, status, kind if status == "failed" else None)
                        continue
                    items.append((cls, url))
            bar = progress_bar(transient=False, unit="URLs") if progress and items else None
            with bar or contextlib.nullcontext():
                if items:
                    with decode_blocks():
                        asyncio.run(_run(items, states, dest, writer, summary, opt, workers, per_host, max_pics,
                                         bar, policy, credits))
        finally:
            writer.close()
            summary.elapsed = time.perf_counter() - started
    return summary
