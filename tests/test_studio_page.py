"""ursa studio in headless Debian chromium: the whole flow with a fake camera, and a 10,000-image project opening fast."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS, load_benchmark, wait_until


@pytest.fixture(scope="module")
def bench():
    import sys

    mod = load_benchmark("studio")
    yield mod
    sys.modules.pop("bench_studio", None)


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 8) -> Path:
    """A YUV4MPEG2 file (4:2:0) of RGB frames: the format chromium's fake camera plays (looped)."""
    h, w, _ = frames[0].shape
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
            y = 0.299 * r + 0.587 * g + 0.114 * b
            u = -0.1687 * r - 0.3313 * g + 0.5 * b + 128
            v = 0.5 * r - 0.4187 * g - 0.0813 * b + 128
            sub = lambda p: p.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # noqa: E731
            f.write(b"FRAME\n")
            for plane in (y, sub(u), sub(v)):
                f.write(np.clip(np.rint(plane), 0, 255).astype(np.uint8).tobytes())
    return path


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []


def _launch(p, extra: list[str]):
    if not os.path.exists(CHROMIUM):  # the skip check fails the run on this: a page left untested is no pass
        pytest.skip(f"{CHROMIUM} not installed (make test installs it with apt-get when run as root)")
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + extra, headless=True)


def _watch(page) -> tuple[list[str], list[str]]:
    """Every request's host (anything not 127.0.0.1 is aborted, and recorded) and every console error."""
    hosts: list[str] = []
    errors: list[str] = []

    def route(r):
        host = urlsplit(r.request.url).hostname or ""
        hosts.append(host)
        if host != "127.0.0.1":
            return r.abort()
        return r.continue_()
    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return hosts, errors


@pytest.mark.browser
def test_the_whole_flow_with_a_fake_camera(tmp_path: Path, bench, artifacts: Path):
    from playwright.sync_api import sync_playwright

    from ursa.apps.studio import Studio

    rng = np.random.default_rng(0)
    frames = [np.asarray(bench.picture(c, rng, (320, 240))) for c in ["red"] * 8 + ["blue"] * 8]
    camera = write_y4m(tmp_path / "camera.y4m", frames)
    uploads = tmp_path / "uploads"
    for c in ("red", "blue"):
        (uploads / c).mkdir(parents=True)
        for i in range(12):
            bench.picture(c, rng, (96, 72)).save(uploads / c / f"{c}{i}.jpg", quality=90)
    project, runs = tmp_path / "project", tmp_path / "runs"
    studio = Studio(project, runs)
    port = bench.free_port()
    server, thread = bench.serve_in_thread(studio, port)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = _launch(p, ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                  f"--use-file-for-fake-video-capture={camera}"])
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page = ctx.new_page()
            hosts, errors = _watch(page)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")

            for c in ("red", "blue"):  # two classes
                page.fill("#class-name", c)
                page.click("#new-class button")
                page.wait_for_selector(f".card[data-class='{c}']")
            assert sorted(p.name for p in project.iterdir() if p.is_dir()) == ["blue", "red"]

            page.click("#cam-start")
            wait_until(page, "document.getElementById('video').videoWidth > 0", 30)
            for c in ("red", "blue"):  # hold the button: frames of the fake camera land as files
                page.locator(f".card[data-class='{c}'] .record").hover()
                page.mouse.down()
                time.sleep(2.0)
                page.mouse.up()
                try:
                    wait_until(page, f"(document.querySelector(\".card[data-class='{c}']\").dataset.count|0) >= 2", 30)
                except AssertionError:
                    print(errors, files_in(project / c), page.locator("#cards").inner_html()[:3000])
                    page.screenshot(path="/tmp/studio-fail.png", full_page=True)
                    raise
                captured = files_in(project / c)
                assert len(captured) >= 2 and all(f.name.startswith("cam-") and f.suffix == ".jpg" for f in captured)

            for c in ("red", "blue"):  # files by upload
                page.locator(f".card[data-class='{c}'] input.upload").set_input_files(sorted(map(str, (uploads / c).iterdir())))
            for c in ("red", "blue"):
                wait_until(page, f"document.querySelector(\".card[data-class='{c}'] .added\").textContent.startsWith('added 12')", 60)
                assert {f.name for f in files_in(project / c)} >= {f"{c}{i}.jpg" for i in range(12)}
            wait_until(page, "[...document.querySelectorAll('.card .thumbs img')].slice(0, 8).every(i => i.complete)")
            page.screenshot(path=str(artifacts / "studio_classes.png"), full_page=True)

            page.fill("#opt-epochs", "2")
            page.fill("#opt-budget", "0")
            page.fill("#opt-size", "64")
            page.click("#train-btn")  # the page stays live while the child process trains
            page.wait_for_selector("body[data-job='running']")
            # any end (done, failed, cancelled): a failed or stuck child is reported with its console and the server's
            # own view of the job (a page that missed the end shows "running" while the server says "done")
            ended = "['done', 'failed', 'cancelled'].includes(document.body.dataset.job)"
            try:
                wait_until(page, ended, 300)
            except AssertionError:
                job = studio.jobs.current
                raise AssertionError(f"page: {page.evaluate('document.body.dataset.job')}, server: "
                                     f"{job and job.to_json()}") from None
            state = page.evaluate("document.body.dataset.job")
            console = runs / "run-1.console.txt"
            assert state == "done", (state, console.read_text(errors="replace")[-3000:] if console.is_file() else "no console")
            page.wait_for_selector("body[data-results='1']", timeout=30_000)
            assert page.locator("#epochs tbody tr").count() == 2
            assert page.locator("#result-line").inner_text().startswith("Error ")
            cells = page.locator("#matrix td")
            assert cells.count() == 4
            n_valid = sum(int(t) for t in cells.all_inner_texts())
            run = runs / "run-1"
            assert (run / "model.safetensors").is_file() and (run / "model.onnx").is_file()
            assert n_valid == sum(1 for line in (run / "split.csv").read_text().splitlines()[1:] if line.endswith(("True", "true", "1")))
            cells.nth(1).click()  # clickable: the top losses narrow to that cell
            page.wait_for_selector("#matrix td.picked")
            cells.nth(1).click()  # and back to all of them
            page.locator("#losses .loss img").first.click()  # the model's evidence over a top loss
            wait_until(page, "(i => i.src.includes('/heat?') && i.complete && i.naturalWidth > 0)"
                             "(document.querySelector('#losses .loss img'))", 30)
            page.screenshot(path=str(artifacts / "studio_results.png"), full_page=True)

            page.click("#clean-open")  # the cleaner's own ranking, decisions and log
            page.wait_for_selector("#cleaner .item.focused", timeout=180_000)
            first = page.locator("#cleaner .item.focused").get_attribute("data-name")
            page.keyboard.press("x")
            page.wait_for_selector(f"#cleaner .item.status-exclude[data-name='{first}']")
            log = (project / "clean_log.csv").read_text().splitlines()
            assert len(log) == 2 and f",{first}," in log[1] and ",exclude," in log[1]

            page.click("#live-btn")  # the fake camera's frames, predicted continuously
            t0 = time.monotonic()
            wait_until(page, "(document.body.dataset.live|0) >= 10", 60)
            rate = 10 / (time.monotonic() - t0)
            page.click("#live-btn")
            assert page.locator("#bars .row").count() == 2
            assert page.locator("#verdict").inner_text().strip()
            page.screenshot(path=str(artifacts / "studio_live.png"), full_page=True)
            print(f"live predictions in the page: {rate:.1f}/s (busy machine)")

            with page.expect_download() as dl:
                page.click("#dl-model")
            saved = tmp_path / "downloaded.safetensors"
            dl.value.save_as(saved)
            assert saved.read_bytes() == (run / "model.safetensors").read_bytes()
            assert "ursa serve" in page.locator("#commands").inner_text()

            assert hosts and set(hosts) == {"127.0.0.1"}, sorted(set(hosts))
            assert not errors, errors
            ctx.close()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.browser
def test_ten_thousand_images_open_fast(tmp_path: Path, bench, artifacts: Path):
    """First page load and first thumbnails: measured in benchmarks/studio.py (under 2 s), asserted loosely here."""
    from playwright.sync_api import sync_playwright

    from ursa.apps.studio import Studio

    project = bench.make_project(tmp_path / "big", 10_000)
    studio = Studio(project, tmp_path / "runs")
    port = bench.free_port()
    server, thread = bench.serve_in_thread(studio, port)
    try:
        with sync_playwright() as p:
            browser = _launch(p, [])
            t = bench.page_load(browser, f"http://127.0.0.1:{port}/")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"10,000 images: classes shown in {t['ready_s']} s, first thumbnails in {t['thumbs_s']} s (busy machine)")
    assert t["thumbs_s"] < 15  # loose: a busy 2-core CI machine; the benchmark measures it
    # Only what is on screen: the first page of each class (24), a second one where a card's end shows; never 10,000.
    assert t["thumbs_requested"] <= 4 * 24 * 2 and studio.thumbs.made <= 4 * 24 * 2


@pytest.mark.browser
def test_paste_adds_to_the_card_last_pointed_at(tmp_path: Path, bench):
    """Ctrl+V of a picture lands in the card under the pointer (or last clicked), not always in the first card."""
    from playwright.sync_api import sync_playwright

    from ursa.apps.studio import Studio

    import base64
    import io

    buf = io.BytesIO()
    bench.picture("red", np.random.default_rng(1), (64, 48)).save(buf, "PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    studio = Studio(tmp_path / "project", tmp_path / "runs")
    for c in ("apples", "pears"):
        studio.project.create(c)
    port = bench.free_port()
    server, thread = bench.serve_in_thread(studio, port)
    paste = ("(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)); const dt = new DataTransfer();"
             " dt.items.add(new File([bytes], 'pasted.png', { type: 'image/png' }));"
             " document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true })); }")
    try:
        with sync_playwright() as p:
            browser = _launch(p, [])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            hosts, errors = _watch(page)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(".card[data-class='pears']")
            page.locator(".card[data-class='pears'] h3").hover()
            page.evaluate(paste, png)
            wait_until(page, "document.querySelector(\".card[data-class='pears'] .count\").textContent.startsWith('1 ')", 30)
            page.locator(".card[data-class='apples'] h3").click()
            page.evaluate(paste, png)
            wait_until(page, "document.querySelector(\".card[data-class='apples'] .count\").textContent.startsWith('1 ')", 30)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert [f.name for f in files_in(studio.project.root / "pears")] == ["pasted.png"]
    assert [f.name for f in files_in(studio.project.root / "apples")] == ["pasted.png"]
    assert set(hosts) == {"127.0.0.1"} and not errors, errors
