"""No silent skips: a run in which a test skipped (or xfailed) fails, unless the test is listed
in ALLOWED_SKIPS with the reason it may skip.

A skip that leaves the run green hides a check that never ran: a missing dependency, a browser
that was not installed, a corpus that could not be fetched. Hard dependencies are imported
plainly, so their absence is an error, not a skip.
"""
from __future__ import annotations

import pytest

# Test node id (parameters left off) → why it may skip. Only tests that need hardware this
# project is not lent (a GPU) belong here.
ALLOWED_SKIPS: dict[str, str] = {}


def unparametrised(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


class SkipPolicy:
    def __init__(self, allowed: dict[str, str]) -> None:
        self.allowed = allowed
        self.unexpected: list[tuple[str, str]] = []

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or unparametrised(report.nodeid) in self.allowed:
            return
        if hasattr(report, "wasxfail"):
            reason = f"xfail: {report.wasxfail}"
        elif isinstance(report.longrepr, tuple):
            reason = report.longrepr[2]
        else:
            reason = str(report.longrepr)
        self.unexpected.append((report.nodeid, reason))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.unexpected and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.unexpected:
            return
        terminalreporter.section("skipped tests fail the run (tests/skip_policy.py)", red=True)
        for nodeid, reason in self.unexpected:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
        terminalreporter.line("A test may skip only if tests/skip_policy.py ALLOWED_SKIPS lists it with a reason.")


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist the controller sees every worker's reports and sets the run's exit status.
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(SkipPolicy(ALLOWED_SKIPS), "xmodal-skip-policy")
