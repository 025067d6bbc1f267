"""tests/skip_policy.py: a skipped or xfailed test fails the run unless it is listed with a reason."""
import pytest

import skip_policy

TESTS = """
import pytest

def test_runs():
    pass

def test_needs_a_gpu():
    pytest.skip("no GPU here")

@pytest.mark.parametrize("n", [1, 2])
def test_expected_to_fail(n):
    pytest.xfail("not built yet")
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=TESTS)
    return pytester.runpytest("-p", "skip_policy", "-p", "no:cacheprovider", *args)


def test_a_skip_or_xfail_fails_an_otherwise_green_run_and_is_named(pytester):
    result = run(pytester)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*skipped tests fail the run*",
        "test_inner.py::test_needs_a_gpu: *no GPU here",
        "test_inner.py::test_expected_to_fail[[]1[]]: xfail: not built yet",
    ])


def test_tests_listed_with_a_reason_may_skip(pytester, monkeypatch):
    monkeypatch.setitem(skip_policy.ALLOWED_SKIPS, "test_inner.py::test_needs_a_gpu", "needs a GPU")
    monkeypatch.setitem(skip_policy.ALLOWED_SKIPS, "test_inner.py::test_expected_to_fail", "not built")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.OK
    assert "skipped tests fail the run" not in result.stdout.str()


def test_a_run_without_skips_passes(pytester):
    assert run(pytester, "-k", "test_runs").ret == pytest.ExitCode.OK
