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
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Download the images behind per-class URL lists; every URL is accounted for in DEST/downloads.csv."""
    from ursa.acquire.download import download_images

    summary = download_images(
        urls, dest, max_pics=max_pics, workers=workers, per_host=per_host, timeout=timeout, deadline=deadline,
        retries=retries, max_size=max_size, max_bytes=max_bytes, retry_failed=retry_failed, progress=not quiet,
        allow_private=allow_private,
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
