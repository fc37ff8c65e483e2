"""The skip check (tests/skip_check.py) on tiny test files run by a pytest of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from skip_check import pytest_addoption, register


def pytest_configure(config):
    register(config)
"""

INI = """[pytest]
markers =
    gpu: whether it runs depends on this machine's GPU
"""

SKIPS = """
import pytest


def test_runs():
    pass


def test_skip_call():
    pytest.skip("no data here")


@pytest.mark.skipif(True, reason="not on this box")
def test_skipif():
    pass


@pytest.fixture
def needs_thing():
    pytest.skip("fixture says no")


def test_fixture_skip(needs_thing):
    pass


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False


@pytest.mark.xfail(reason="maybe fixed")
def test_xpass():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("no_such_module_for_the_skip_check")


def test_never():
    pass
"""

GPU = """
import pytest


@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA GPU here")


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="this machine has a GPU")
def test_cpu_only():
    pass


def test_runs():
    pass
"""


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest on the folder alone: its own ini and conftest, no installed plugins (faster to start)."""
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(folder / "pytest.ini"),
                           "--rootdir", str(folder), *args], cwd=folder, capture_output=True, text=True, timeout=120,
                          env=env)


def _folder(tmp_path: Path, **files: str) -> Path:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "pytest.ini").write_text(INI)
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    return tmp_path


def test_any_skip_but_a_gpu_one_fails_the_run_and_is_named(tmp_path):
    folder = _folder(tmp_path, test_skips=SKIPS, test_module_skip=MODULE_SKIP, test_gpu=GPU)
    r = _pytest(folder)
    assert r.returncode == 1, r.stdout[-3000:]  # every test that ran passed; the skips fail the run
    out = r.stdout
    for line in ("test_skips.py::test_skip_call: skipped: no data here",
                 "test_skips.py::test_skipif: skipped: not on this box",
                 "test_skips.py::test_fixture_skip: skipped: fixture says no",
                 "test_skips.py::test_xfail: xfailed: known bug",
                 "test_skips.py::test_xpass: xpassed: maybe fixed",
                 "test_module_skip.py: skipped: could not import 'no_such_module_for_the_skip_check'"):
        assert line in out, out[-3000:]
    assert "6 test(s) did not run for a reason other than a missing GPU" in out
    assert "test_gpu.py::" not in out.split("skips that fail this run")[1]


def test_gpu_marked_skips_alone_pass(tmp_path):
    r = _pytest(_folder(tmp_path, test_gpu=GPU))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 GPU test(s) skipped on this machine" in r.stdout and "skips that fail" not in r.stdout


def test_allow_skips_turns_the_check_off_and_failures_still_fail(tmp_path):
    folder = _folder(tmp_path, test_skips=SKIPS)
    assert _pytest(folder, "--allow-skips").returncode == 0
    (folder / "test_fails.py").write_text("def test_no():\n    assert False\n")
    r = _pytest(folder)
    assert r.returncode == 1 and "1 failed" in r.stdout and "skips that fail this run" in r.stdout
