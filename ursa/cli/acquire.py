"""`ursa download` and `ursa verify`: gather images, then check every one of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli.common import Quiet


def download_cmd(
    urls: Annotated[
        list[str],
        typer.Argument(metavar="URLS", help="URL lists: CLASS=FILE or files named urls_<class>.txt / urls_<class>.csv."),
    ],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Folder for DEST/<class>/ images and downloads.csv.")],
    max_pics: Annotated[int, typer.Option(help="Most images saved per class (0 = no cap).")] = 200,
    workers: Annotated[int, typer.Option(help="Downloads in flight at once.")] = 16,
    per_host: Annotated[int, typer.Option(help="Most requests in flight to one host.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection or the next bytes.")] = 10.0,
    deadline: Annotated[
        Optional[float], typer.Option(help="Most seconds spent on one URL, retries included [default: 6 x timeout].")
    ] = None,
    retries: Annotated[int, typer.Option(help="Retries after a timeout, a 429 or a 5xx.")] = 3,
    max_size: Annotated[int, typer.Option(help="Shrink the long side to this many pixels (0 = keep as is).")] = 1024,
    max_bytes: Annotated[str, typer.Option(help="Skip downloads bigger than this (e.g. 20MB, 500KB).")] = "20MB",
    retry_failed: Annotated[bool, typer.Option(help="Retry URLs that failed in an earlier run.")] = True,
    allow_private: Annotated[
        bool, typer.Option("--allow-private", help="Also fetch from this computer and private networks (refused by default).")
    ] = False,
    license: Annotated[
        Optional[str], typer.Option("--license", help="Fetch only URLs whose list gives one of these licences (cc0,by).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Download the images behind per-class URL lists; every URL is accounted for in DEST/downloads.csv."""
    from ursa.acquire.download import download_images

    summary = download_images(
        urls, dest, max_pics=max_pics, workers=workers, per_host=per_host, timeout=timeout, deadline=deadline,
        retries=retries, max_size=max_size, max_bytes=max_bytes, retry_failed=retry_failed, progress=not quiet,
        allow_private=allow_private, licenses=license,
    )
    print(summary.to_json() if json_out else summary.format())


def verify_cmd(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of class folders to check.")],
    delete: Annotated[bool, typer.Option("--delete", help="Delete broken files instead of quarantining them.")] = False,
    fix: Annotated[
        bool, typer.Option("--fix", help="Replace CMYK/palette/RGBA/16-bit (and oversized) images by RGB copies.")
    ] = False,
    max_size: Annotated[Optional[int], typer.Option(help="With --fix: shrink the long side to this.")] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Processes; 1 = no pool [default: min(4, CPUs), 1 under 16 MB of images].")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Decode every image; move broken ones to _quarantine/ (or delete them) and record why in verify.csv."""
    from ursa.acquire.verify import verify_images

    summary = verify_images(folder, delete=delete, fix=fix, max_size=max_size, workers=workers, progress=not quiet)
    print(summary.to_json() if json_out else summary.format())


def search_cmd(
    query: Annotated[str, typer.Argument(metavar="QUERY", help="Search words, e.g. \"grizzly bear\".")],
    cls: Annotated[
        Optional[str], typer.Option("--class", "-c", help="Class the list is for [default: the query with _ for spaces].")
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Most results to write.")] = 200,
    provider: Annotated[
        Optional[list[str]],
        typer.Option("--provider", "-p", help="openverse, commons or pexels (PEXELS_API_KEY); repeat or comma-separate "
                     "[default: openverse,commons]."),
    ] = None,
    endpoint: Annotated[
        Optional[list[str]],
        typer.Option("--endpoint", help="Another base URL: URL for one provider, or NAME=URL (also URSA_<NAME>_ENDPOINT)."),
    ] = None,
    license: Annotated[
        Optional[str], typer.Option("--license", help="Keep only these licences, e.g. cc0,by or cc0,pdm,by,by-sa.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The URL list [default: urls_<class>.csv].")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection or the next bytes.")] = 10.0,
    retries: Annotated[int, typer.Option(help="Retries after a timeout, a 429 or a 5xx.")] = 3,
    allow_private: Annotated[
        bool, typer.Option("--allow-private", help="Also ask, and keep results on, this computer and private networks.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> int:
    """Search openly licensed images and write urls_<class>.csv (url, source page, creator, licence) for download."""
    from ursa.acquire.search import search_images

    summary = search_images(query, cls, n, providers=provider, endpoint=endpoint, licenses=license, out=out,
                            timeout=timeout, retries=retries, allow_private=allow_private, progress=not quiet)
    print(summary.to_json() if json_out else summary.format())
    if summary.interrupted:
        return 130  # as for any Ctrl-C, after the results found until then were written
    return 0 if summary.results or summary.total else 1


def credits_cmd(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="The folder `ursa download --dest` wrote.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write [default: DIR/CREDITS.md].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write CREDITS.md: creator, licence and source of every image still in DIR's class folders."""
    import json

    from ursa.acquire.credits import write_credits

    summary = write_credits(folder, out)
    print(json.dumps(summary.to_dict(), indent=2) if json_out else summary.format())
