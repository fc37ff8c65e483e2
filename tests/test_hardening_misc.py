"""Issue 29, small items: credentials in URLs, decisions taken from data rather than wording, one home each
for the softmax, the thread count and the weighted semaphore, and the licence's SPDX form."""

from __future__ import annotations

import tomllib
from pathlib import Path

from ursa.acquire.download import download_images
from ursa.acquire.manifest import read_manifest
from ursa.acquire.urls import redacted

try:
    from tests.fault_server import FaultServer, make_images
except ImportError:  # pragma: no cover - run from tests/
    from fault_server import FaultServer, make_images

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(timeout=2.0, retries=1, backoff=0.01, max_retry_after=1.0, progress=False)


def test_credentials_are_redacted_wherever_a_url_appears():
    assert redacted("http://user:pw@host.example/a.jpg") == "http://***@host.example/a.jpg"
    assert redacted("https://tok%40en@h.example:8443/x?q=a@b") == "https://***@h.example:8443/x?q=a@b"
    assert redacted("failed: GET http://a:b@h/x then https://h2/y") == "failed: GET http://***@h/x then https://h2/y"
    assert redacted("http://host.example/a@b.jpg") == "http://host.example/a@b.jpg"  # an @ in the path is no user


def test_downloads_csv_never_holds_a_password_and_resume_still_matches(tmp_path):
    with FaultServer(make_images(1)) as srv:
        url = srv.url("img/0.jpg").replace("http://", "http://alice:s3cret@")
        urls = tmp_path / "u.txt"
        urls.write_text(url + "\n")
        dest = tmp_path / "d"
        first = download_images({"c": urls}, dest, allow_private=True, **FAST)
        again = download_images({"c": urls}, dest, allow_private=True, **FAST)
    text = (dest / "downloads.csv").read_text()
    assert first.saved == 1 and "s3cret" not in text and "alice" not in text
    assert [r["url"] for r in read_manifest(dest / "downloads.csv")] == [redacted(url)]
    assert again.skipped == 1 and again.saved == 0  # the redacted row still stands for the URL


def test_a_refused_row_is_retried_by_what_its_url_is_not_by_its_wording():
    from ursa.acquire.download import _retry_row

    row = {"status": "refused", "url": "http://10.0.0.1/x.jpg", "error": "refused: (reworded message)"}
    assert _retry_row(row)  # the address may be allowed now, whatever the message says
    assert not _retry_row({**row, "url": "ftp://a.example/x.jpg"})  # the URL itself is refused: stays refused


def test_one_softmax_one_thread_count_one_weighted_semaphore():
    from ursa.acquire.fetch import MemoryBudget
    from ursa.apps.serve import model as serve_model
    from ursa.apps.serve.limits import PixelBudget
    from ursa.diagnose import calibration
    from ursa.inference import predictor, results, runtime
    from ursa.util import device, numbers, semaphore

    assert calibration.softmax is results.softmax is numbers.softmax
    assert predictor.default_threads is serve_model.default_threads is device.default_threads
    assert runtime.cores is device.cores
    assert issubclass(MemoryBudget, semaphore.WeightedSemaphore) and issubclass(PixelBudget, semaphore.WeightedSemaphore)


def test_the_licence_is_an_spdx_string_with_a_setuptools_floor_that_reads_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # a table makes setuptools >= 77 print a deprecation banner
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"])
