"""ursa download against a local server that fails in every way the internet does (no network)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ursa.acquire.download import download_images
from ursa.acquire.manifest import MANIFEST_COLUMNS, read_manifest
from ursa.acquire.urls import DownloadError, parse_source, parse_url_file, parse_url_text
from ursa.cli import main
from ursa.vision.images import open_image

try:
    from tests.fault_server import FaultServer, bear_images, make_images
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from fault_server import FaultServer, bear_images, make_images

REPO = Path(__file__).resolve().parents[1]
FAST = dict(timeout=0.5, retries=2, backoff=0.01, max_retry_after=2.0, progress=False, allow_private=True)


def _png(size: tuple[int, int], color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _rows_by_url(dest: Path) -> dict[str, dict[str, str]]:
    rows = read_manifest(dest / "downloads.csv")
    by_url = {r["url"]: r for r in rows}
    assert len(by_url) == len(rows), "a URL appears twice in the manifest"
    return by_url


def _write_list(path: Path, urls: list[str]) -> Path:
    path.write_text("\n".join(urls) + "\n")
    return path


def _assert_folder_matches_manifest(dest: Path, cls: str) -> None:
    """Only saved files, each once, each a decodable image; no temp files left behind."""
    rows = read_manifest(dest / "downloads.csv")
    saved = {r["file"] for r in rows if r["status"] == "saved" and r["class"] == cls}
    on_disk = {f"{cls}/{p.name}" for p in (dest / cls).iterdir()}
    assert on_disk == saved
    shas = [hashlib.sha256((dest / f).read_bytes()).hexdigest() for f in saved]
    assert len(shas) == len(set(shas)), "identical content stored twice"
    for f in saved:
        open_image(dest / f)  # raises if any saved file is not a full image


@pytest.fixture(scope="module")
def server():
    images = make_images(8)
    images["wide.png"] = _png((800, 400))
    images["small.png"] = _png((60, 40), (200, 0, 0))
    with FaultServer(images) as srv:
        yield srv


# ----------------------------------------------------------------------------- parsing


def test_parse_accepts_what_browser_snippets_save():
    text = (
        "\ufeff  https://a.example/1.jpg  \r\n"
        "\n"
        '"https://a.example/2.jpg"\n'
        "'https://a.example/3.jpg',\n"
        "https%3A//a.example/4.jpg%3Fx%3D1\n"
        "https%3A%2F%2Fa.example%2F5.jpg\n"
        "https://a.example/1.jpg\n"  # duplicate
        "https://encrypted-tbn0.gstatic.com/images?q=tbn%3AANd9Gc&usqp=CAU\n"  # escaped query stays escaped
        "x-raw-image:///d937e6\n"
        "# a comment\n"
    )
    assert parse_url_text(text) == [
        "https://a.example/1.jpg",
        "https://a.example/2.jpg",
        "https://a.example/3.jpg",
        "https://a.example/4.jpg?x=1",
        "https://a.example/5.jpg",
        "https://encrypted-tbn0.gstatic.com/images?q=tbn%3AANd9Gc&usqp=CAU",
        "x-raw-image:///d937e6",
    ]


def test_parse_csv_with_url_column():
    text = 'title,URL,width\n"a, bear",https://a.example/1.jpg,10\nb,https://a.example/2.jpg,20\n\nc,https://a.example/1.jpg,3\n'
    assert parse_url_text(text) == ["https://a.example/1.jpg", "https://a.example/2.jpg"]
    assert parse_url_text("url\nhttps://a.example/1.jpg\n") == ["https://a.example/1.jpg"]
    # a plain list whose first URL holds commas is not mistaken for a CSV
    plain = "https://res.example/w_300,h_200/1.jpg\nhttps://a.example/2.jpg\n"
    assert parse_url_text(plain) == ["https://res.example/w_300,h_200/1.jpg", "https://a.example/2.jpg"]


def test_parse_url_lists_in_the_courses_format(url_lists_dir):
    """Three repositories' lists (tests/synthetic_sets.py): blank lines, duplicates, a .csv name on a plain list."""
    from synthetic_sets import RAW_IMAGE_URL

    files = sorted(url_lists_dir.glob("*/urls_*.*"))
    assert len(files) == 9
    non_http = []
    for f in files:
        urls = parse_url_file(f)
        lines = {ln.strip() for ln in f.read_text().splitlines() if ln.strip()}
        assert len(urls) == len(lines), f  # blank lines and duplicates dropped, nothing else
        assert len(urls) > 300
        non_http += [u for u in urls if not u.startswith(("http://", "https://"))]
        cls, path = parse_source(f)
        assert path == f and cls in ("black", "grizzly", "teddys")
    assert non_http == [RAW_IMAGE_URL]


def test_parse_source_forms(tmp_path):
    f = _write_list(tmp_path / "bears.txt", ["https://a.example/1.jpg"])
    assert parse_source(f"grizzly={f}") == ("grizzly", f)
    g = _write_list(tmp_path / "urls_teddy.csv", ["https://a.example/1.jpg"])
    assert parse_source(g) == ("teddy", g)
    with pytest.raises(DownloadError, match="cannot tell the class"):
        parse_source(f)
    with pytest.raises(DownloadError, match="not found"):
        parse_source(tmp_path / "urls_black.txt")
    with pytest.raises(DownloadError, match="not a usable class name"):
        parse_source(f"../up={f}")
    with pytest.raises(DownloadError, match="not a usable class name"):
        parse_source(f"_quarantine={f}")


def test_cli_bad_input_exits_2(tmp_path, capsys):
    empty = tmp_path / "urls_empty.txt"
    empty.write_text("\n   \n")
    good = _write_list(tmp_path / "g.txt", ["https://a.example/1.jpg"])
    dest = str(tmp_path / "out")
    assert main(["download", str(tmp_path / "urls_missing.txt"), "--dest", dest]) == 2
    assert "urls_missing.txt: URL file not found" in capsys.readouterr().err
    assert main(["download", str(empty), "--dest", dest]) == 2
    assert "no URLs found" in capsys.readouterr().err
    assert main(["download", "=" + str(good), "--dest", dest]) == 2
    assert main(["download", str(good), "--dest", dest]) == 2
    assert "urls_<class>.txt" in capsys.readouterr().err
    assert main(["download", f"g={good}", "--dest", dest, "--max-bytes", "lots"]) == 2
    assert not (tmp_path / "out" / "downloads.csv").exists()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["download", f"g={good}", "--dest", str(locked)]) == 2  # refused even as root
    assert "read-only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def fault_run(server, tmp_path_factory):
    """One run over every fault; several tests read its manifest."""
    s = server.url
    urls = {
        "ok": s("img/0.jpg"),
        "ok2": s("img/1.jpg"),
        "dup": s("img/0.jpg?copy=1"),
        "404": s("status/404"),
        "403": s("status/403"),
        "500": s("status/500"),
        "flaky": s("flaky/2/2.jpg"),
        "ratelimit": s("ratelimit/1/3.jpg"),
        "ratelimit_capped": s("ratelimit/100/4.jpg"),
        "slow": s("slow/2/5.jpg"),
        "redirect": s("redirect/3/6.jpg"),
        "loop": s("loop"),
        "html": s("html"),
        "truncated": s("truncated/7.jpg"),
        "halfimage": s("halfimage/7.jpg"),
        "big": s("big/300000"),
        "bigstream": s("bigstream/300000"),
        "reset": s("reset"),
        "raw": "x-raw-image:///d937e6490875",
        "ftp": "ftp://example.com/bear.jpg",
    }
    dest = tmp_path_factory.mktemp("faults")
    url_file = _write_list(dest.parent / f"{dest.name}_urls_grizzly.txt", list(urls.values()))
    t0 = time.perf_counter()
    summary = download_images({"grizzly": url_file}, dest, max_bytes="200KB", **FAST)
    return urls, dest, summary, time.perf_counter() - t0


def test_every_fault_recorded_with_its_reason(fault_run, server):
    urls, dest, summary, _ = fault_run
    rows = _rows_by_url(dest)
    assert set(rows) == set(urls.values())
    header = (dest / "downloads.csv").read_text().splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS)

    def row(key: str) -> dict[str, str]:
        return rows[urls[key]]

    # "ok" and "dup" serve the same bytes concurrently: whichever finishes first is saved.
    assert sorted([row("ok")["status"], row("dup")["status"]]) == ["duplicate", "saved"]
    expected = {
        "ok2": ("saved", "200", ""),
        "404": ("failed", "404", "http_404: HTTP 404"),
        "403": ("failed", "403", "http_403: HTTP 403"),
        "500": ("failed", "500", "http_500: HTTP 500 Internal Server Error (after 3 attempts)"),
        "flaky": ("saved", "200", ""),
        "ratelimit": ("saved", "200", ""),
        "ratelimit_capped": ("saved", "200", ""),
        "slow": ("failed", "", "timeout:"),
        "redirect": ("saved", "200", ""),
        "loop": ("failed", "", "redirect: too many redirects"),
        "html": ("failed", "200", "not_image: an HTML page"),
        "truncated": ("failed", "", "truncated: connection closed after"),
        "halfimage": ("failed", "200", "truncated:"),
        "big": ("failed", "200", "too_large: Content-Length 300,000"),
        "bigstream": ("failed", "200", "too_large: over --max-bytes"),
        "reset": ("failed", "", "connection: connection reset by peer"),
        "raw": ("refused", "", "refused: x-raw-image: URL"),
        "ftp": ("refused", "", "refused: ftp: URL"),
    }
    for key, (status, http, error) in expected.items():
        r = row(key)
        assert (r["status"], r["http_status"]) == (status, http), (key, r)
        assert r["error"].startswith(error), (key, r["error"])
        if status == "saved":
            assert r["error"] == "" and r["file"].startswith("grizzly/") and int(r["bytes"]) > 0
            assert hashlib.sha256((dest / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    assert "Content-Type image/jpeg" in row("html")["error"]
    assert row("dup")["file"] == row("ok")["file"]
    assert row("dup")["sha256"] == row("ok")["sha256"]
    assert summary.saved == 6 and summary.duplicate == 1 and summary.refused == 2 and summary.failed == 11
    assert summary.failures["too_large"] == 2 and summary.failures["truncated"] == 2
    _assert_folder_matches_manifest(dest, "grizzly")


def test_retries_only_what_is_worth_retrying(fault_run, server):
    urls, _, _, _ = fault_run
    path = lambda key: urls[key].split(str(server.port), 1)[1]  # noqa: E731
    assert server.count(path("404")) == 1  # a 404 is final
    assert server.count(path("html")) == 1  # so is content that is not an image
    assert server.count(path("flaky")) == 3  # 500, 500, then the image
    assert server.count(path("500")) == 3  # a 5xx is retried, then recorded with its status
    assert server.count(path("slow")) == 3  # timeouts are retried (retries=2)
    assert server.count(path("reset")) == 3
    # 429 + Retry-After: 1 -> the second request waits about a second ...
    first, second = server.times[path("ratelimit")][:2]
    assert second - first >= 0.9
    # ... and Retry-After: 100 is capped by max_retry_after=2.
    first, second = server.times[path("ratelimit_capped")][:2]
    assert 1.5 <= second - first < 5


def test_summary_names_failures_and_exit_is_0(server, tmp_path, capsys):
    f = _write_list(tmp_path / "urls_black.txt", [server.url("img/2.jpg"), server.url("status/404"), server.url("html")])
    rc = main(["download", str(f), "--dest", str(tmp_path / "out"), "--quiet", "--timeout", "1", "--retries", "0",
               "--allow-private"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "black" in out and "Failed by reason:" in out
    assert "http_404" in out and "not_image" in out
    assert "2 downloads failed" in out


# ----------------------------------------------------------------------------- resume


def test_second_run_fetches_nothing_new(server, tmp_path):
    urls = [server.url("img/3.jpg"), server.url("img/4.jpg"), server.url("img/3.jpg?again"), server.url("status/404"),
            "x-raw-image:///abc"]
    f = _write_list(tmp_path / "urls_teddy.txt", urls)
    dest = tmp_path / "data"
    first = download_images([f], dest, **FAST)
    assert (first.saved, first.duplicate, first.failed, first.refused) == (2, 1, 1, 1)
    before = {u: server.count(u.split(str(server.port), 1)[1]) for u in urls[:4]}
    files_before = sorted(p.name for p in (dest / "teddy").iterdir())

    second = download_images([f], dest, retry_failed=False, **FAST)
    assert (second.saved, second.duplicate, second.failed, second.skipped) == (0, 0, 0, 5)
    assert {u: server.count(u.split(str(server.port), 1)[1]) for u in urls[:4]} == before

    third = download_images([f], dest, **FAST)  # the default retries the failed one only
    assert (third.saved, third.failed, third.skipped) == (0, 1, 4)
    assert server.count("/status/404") == before[urls[3]] + 1
    assert sorted(p.name for p in (dest / "teddy").iterdir()) == files_before
    rows = _rows_by_url(dest)
    assert set(rows) == set(urls)


def test_max_pics_caps_saved_images_per_class(server, tmp_path):
    urls = [server.url(f"img/{i}.jpg") for i in range(8)]
    f = _write_list(tmp_path / "urls_grizzly.txt", urls)
    dest = tmp_path / "data"
    s1 = download_images([f], dest, max_pics=3, workers=4, **FAST)
    assert s1.saved == 3 and s1.over_cap == 5
    assert len(list((dest / "grizzly").iterdir())) == 3
    assert len(read_manifest(dest / "downloads.csv")) == 3  # not-yet-needed URLs stay unrecorded
    s2 = download_images([f], dest, max_pics=5, workers=4, **FAST)
    assert s2.saved == 2 and s2.skipped == 3
    _assert_folder_matches_manifest(dest, "grizzly")
    assert len(list((dest / "grizzly").iterdir())) == 5


def test_shrink_keeps_aspect_and_extension_follows_content(server, tmp_path):
    f = _write_list(tmp_path / "u.txt", [server.url("img/wide.png"), server.url("img/small.png")])
    dest = tmp_path / "data"
    download_images({"c": f}, dest, max_size=200, **FAST)
    rows = _rows_by_url(dest)
    wide = rows[server.url("img/wide.png")]["file"]
    small = rows[server.url("img/small.png")]["file"]
    assert wide.endswith(".jpg")  # shrunk -> re-encoded as JPEG
    assert small.endswith(".png")  # served as image/jpeg but the bytes are PNG, kept as is
    with Image.open(dest / wide) as im:
        assert im.size == (200, 100)
    assert (dest / small).read_bytes() == server.images["small.png"]


def test_per_host_limit(tmp_path):
    with FaultServer(make_images(12), delay=0.15) as slow:
        f = _write_list(tmp_path / "u.txt", [slow.url(f"img/{i}.jpg") for i in range(12)])
        s = download_images({"c": f}, tmp_path / "d", workers=8, per_host=2, **FAST)
        assert s.saved == 12
        assert slow.max_inflight == 2


def test_torn_manifest_line_and_unrecorded_file_are_recovered(server, tmp_path):
    urls = [server.url(f"img/{i}.jpg") for i in range(4)]
    f = _write_list(tmp_path / "u.txt", urls)
    dest = tmp_path / "data"
    download_images({"c": f}, dest, **FAST)
    manifest = dest / "downloads.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    assert len(lines) == 5
    by_file = {r["url"]: r["file"] for r in read_manifest(manifest)}
    # As if killed: the file of the last URL was renamed into place but its row is half written.
    torn_url = next(u for u in urls if u in lines[-1])
    manifest.write_text("".join(lines[:-1]) + lines[-1][:25])
    (dest / "c" / ".00000009.jpg.123.part").write_bytes(b"\xff\xd8\xff partial")  # an older run's temp name
    (dest / "c" / ".00000010.jpg.k2x8_q.tmp").write_bytes(b"\xff\xd8\xff partial")  # atomic_write_bytes' temp
    s = download_images({"c": f}, dest, **FAST)
    assert (s.saved, s.skipped) == (1, 3)
    rows = _rows_by_url(dest)
    assert set(rows) == set(urls)
    assert rows[torn_url]["file"] == by_file[torn_url]  # the orphan was claimed, not written again
    assert not list((dest / "c").glob(".*"))
    _assert_folder_matches_manifest(dest, "c")


def test_killed_run_resumes_without_duplicates(tmp_path):
    images = make_images(30)
    with FaultServer(images, delay=0.2) as slow:
        urls = [slow.url(f"img/{i}.jpg") for i in range(30)]
        urls += [slow.url(f"img/{i}.jpg?dup") for i in range(4)] + ["x-raw-image:///1", slow.url("status/404")]
        f = _write_list(tmp_path / "urls_grizzly.txt", urls)
        dest = tmp_path / "data"
        manifest = dest / "downloads.csv"
        # The library, not the CLI: the local server is on 127.0.0.1, which needs allow_private.
        script = ("import sys; from ursa.acquire.download import download_images; "
                  "download_images([sys.argv[1]], sys.argv[2], workers=4, per_host=4, progress=False, timeout=2.0, "
                  "max_pics=0, allow_private=True)")
        cmd = [sys.executable, "-c", script, str(f), str(dest)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if manifest.exists() and manifest.read_text().count("\n") >= 9:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
        killed_rows = read_manifest(manifest)
        assert 8 <= len(killed_rows) < len(urls)

        s = download_images([f], dest, **{**FAST, "timeout": 2.0})
        assert s.skipped >= len(killed_rows) - 1  # the 404 may be retried
        rows = read_manifest(manifest)
        assert sorted(r["url"] for r in rows) == sorted(urls)  # every URL exactly once
        status = {r["url"]: r["status"] for r in rows}
        assert sum(v == "saved" for v in status.values()) == 30
        assert sum(v == "duplicate" for v in status.values()) == 4
        assert status["x-raw-image:///1"] == "refused"
        assert status[slow.url("status/404")] == "failed"
        _assert_folder_matches_manifest(dest, "grizzly")


def test_real_bear_thumbnails_saved_byte_for_byte(tmp_path):
    bears = bear_images(6)
    with FaultServer(bears) as srv:
        f = _write_list(tmp_path / "u.txt", [srv.url(f"img/{name}") for name in bears])
        dest = tmp_path / "data"
        s = download_images({"bear": f}, dest, **FAST)
    assert s.saved == 6
    for r in read_manifest(dest / "downloads.csv"):
        name = r["url"].rsplit("/", 1)[1]
        assert (dest / r["file"]).read_bytes() == bears[name]


def test_two_runs_into_one_folder_are_refused(server, tmp_path):
    import fcntl

    f = _write_list(tmp_path / "u.txt", [server.url("img/0.jpg")])
    dest = tmp_path / "data"
    dest.mkdir()
    with open(dest / ".downloads.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as if another run were active
        with pytest.raises(DownloadError, match="another ursa download"):
            download_images({"c": f}, dest, **FAST)
    assert download_images({"c": f}, dest, **FAST).saved == 1  # the lock went with its holder
