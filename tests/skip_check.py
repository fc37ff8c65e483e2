"""A pytest plugin: a run with a skipped test fails, unless the skip is about this machine's GPU.

A skipped test proves nothing, and "passed" over a run that skipped the torchrun, resume and
browser tests says what is not true. So every skip, xfail (strict or not), xpass and
``importorskip`` counts against the run, and the run's exit status is 1 (tests failed) when any
happened, with one line per test naming it and its reason. The one exception is a test marked
``@pytest.mark.gpu``: whether it runs depends on the machine's GPU (it needs one, or it checks what
happens without one), so on another machine it skips, and that is all right.

``--allow-skips`` turns the check off for a local run (a laptop without Chromium, say); ``make
test`` and CI never pass it. conftest.py registers the plugin.
"""

from __future__ import annotations

import pytest

GPU_MARK = "gpu"


class SkipCheck:
    """Collects the skips of one run and fails the run on those not marked gpu (a plugin object)."""

    def __init__(self) -> None:
        self.bad: list[tuple[str, str]] = []  # (test id, what happened)
        self.allowed = 0  # gpu-marked skips
        self.gpu: set[str] = set()  # ids of the tests marked gpu

    def _note(self, report, gpu: bool) -> None:
        if hasattr(report, "wasxfail"):
            what = f"{'xpassed' if report.passed else 'xfailed'}: {report.wasxfail or 'no reason given'}"
        elif report.skipped:
            what = f"skipped: {_reason(report)}"
        else:
            return
        if gpu and not hasattr(report, "wasxfail"):
            self.allowed += 1
        else:
            self.bad.append((report.nodeid, what))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items) -> None:
        self.gpu = {item.nodeid for item in items if item.get_closest_marker(GPU_MARK) is not None}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.skipped:
            self._note(report, report.nodeid in self.gpu)

    def pytest_collectreport(self, report) -> None:
        if report.skipped:  # a module skipped whole (importorskip or skip at import time)
            self._note(report, gpu=False)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.bad:
            terminalreporter.section("skips that fail this run", red=True)
            for nodeid, what in self.bad:
                terminalreporter.line(f"{nodeid}: {what}")
            terminalreporter.line(
                f"{len(self.bad)} test(s) did not run for a reason other than a missing GPU: make them run here "
                f"(generate their data in tests/, install what they need), or mark a GPU test @pytest.mark.{GPU_MARK}")
        elif self.allowed:
            terminalreporter.line(f"{self.allowed} GPU test(s) skipped on this machine (marked {GPU_MARK})")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.bad and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _reason(report) -> str:
    """The reason pytest gives for a skip: longrepr is (file, line, 'Skipped: why') for skips."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_addoption(parser) -> None:
    parser.addoption("--allow-skips", action="store_true",
                     help="do not fail the run when a test not marked gpu skips (local runs only; make test never)")


def register(config) -> None:
    """Called from conftest's pytest_configure."""
    if not config.getoption("--allow-skips"):
        config.pluginmanager.register(SkipCheck(), "skip_check")
