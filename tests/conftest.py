"""Shared fixtures: paths, a tiny trained model, test sets made on the fly, and a headless browser.

Every test runs on a fresh clone: its data is the bundled sample (examples/) or made here
(tests/synthetic_sets.py). The skip check (tests/skip_check.py) fails a run in which a test not
marked gpu skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import synthetic_sets
from skip_check import pytest_addoption  # noqa: F401  (a hook: --allow-skips)
from skip_check import register as register_skip_check

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "bears"
HELDOUT = ROOT / "examples" / "heldout"
# The project machine's real sets, beside the repository: only benchmarks need them, never a test.
# URSA_SHARED_DATASETS points elsewhere (a missing folder simulates a fresh clone).
SHARED = Path(os.environ.get("URSA_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))
ARTIFACTS = ROOT / "test-artifacts"  # screenshots kept for people to look at (git-ignored)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]


def pytest_configure(config) -> None:
    register_skip_check(config)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a busy 2-core machine two OpenMP threads spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Digits 0 1 2 6 7, 100 each, 28x28 grayscale PNGs: mnist_dev's shape (read-only: copy before changing)."""
    return synthetic_sets.digits(tmp_path_factory.mktemp("sets") / "digits")


@pytest.fixture(scope="session")
def hard_digits_dir(tmp_path_factory) -> Path:
    """60 digits of each class, a stray mark on 30% of them: a frozen body leaves ~14% error (read-only)."""
    return synthetic_sets.digits(tmp_path_factory.mktemp("sets") / "hard_digits", per_class=60, stray=0.3)


@pytest.fixture(scope="session")
def broken_dir(tmp_path_factory) -> Path:
    """The eight kinds of file that do not decode (synthetic_sets.BROKEN: name -> kind)."""
    return synthetic_sets.broken(tmp_path_factory.mktemp("sets") / "broken")


@pytest.fixture(scope="session")
def odd_photos_dir(tmp_path_factory) -> Path:
    """Class folders of pictures that decode but trip up naive loaders (lying extensions, RGBA, GIF, 2400 px)."""
    return synthetic_sets.odd_photos(tmp_path_factory.mktemp("sets") / "odd_photos")


@pytest.fixture(scope="session")
def url_lists_dir(tmp_path_factory) -> Path:
    """Three repositories' URL lists for three classes, in the download command's real input format."""
    return synthetic_sets.url_lists(tmp_path_factory.mktemp("sets") / "url_lists")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled bears sample (read-only: copy before changing)."""
    return SAMPLE


def make_image(path: Path, color=(200, 30, 30), size=(64, 48), fmt: str | None = None, mode: str = "RGB") -> Path:
    """A small real image file, so tests need no data on disk."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, fmt)
    return path


def sample_learner(size: int = 128):
    """A fresh Learner on the bundled sample (default backbone, untrained head), seeded."""
    import torch

    from ursa.vision.data import load_dataset

    from ursa.vision.loaders import dataloaders
    from ursa.training.config import LearnerConfig
    from ursa.training.learner import Learner
    from ursa.vision.models import create_model, get_spec

    torch.manual_seed(0)
    ds = load_dataset(SAMPLE)
    spec = get_spec("efficientnet_lite0")
    dls = dataloaders(ds, size, spec.mean, spec.std, bs=32)
    return Learner(dls, create_model("efficientnet_lite0", n_classes=len(ds.classes)), LearnerConfig(quiet=True))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A model trained briefly on the bundled sample at 128 px: a real model file for later stages."""
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(TrainConfig(data=SAMPLE, out=out, epochs=2, unfreeze_epochs=0, size=128, quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run: Path) -> Path:
    """Path of the tiny run's model.safetensors."""
    return tiny_run / "model.safetensors"


@pytest.fixture
def browser():
    """Headless Debian chromium driven by Playwright (never `playwright install`).

    Per test, not per session: Playwright's sync API runs an event loop in this thread while it
    is open, which would make every later asyncio.run() in the session fail.
    """
    if not os.path.exists(CHROMIUM):  # the skip check fails the run on this: a page left untested is no pass
        pytest.skip(f"{CHROMIUM} not installed (make test installs it with apt-get when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def artifacts() -> Path:
    """Folder for screenshots a person may want to look at after the run."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled sample."""
    dst = tmp_path / "bears"
    shutil.copytree(SAMPLE, dst)
    return dst


def wait_until(page, expression: str, timeout: float = 15.0) -> None:
    """Poll a page expression from Python: our pages' CSP forbids the eval wait_for_function uses."""
    import time

    end = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def load_benchmark(name: str):
    """A script in benchmarks/ as a module (benchmarks/ is not a package); the caller pops it from sys.modules."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


def start_page(args: list[str], port: int, log: Path):
    """`python -m ursa ARGS` (a command that serves a page) in a child process, returned once it answers on port.

    Fails the test with the child's output when it exits or does not come up in 3 minutes.
    PYTHONPATH is this checkout, so the child runs the code under test (not another editable install's).
    """
    import subprocess
    import sys
    import time

    import httpx

    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ursa", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    out.close()
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"the page did not start (exit {proc.returncode}): {log.read_text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/favicon.ico", timeout=2).status_code == 204:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the page did not come up: {log.read_text()}"
        time.sleep(0.25)
