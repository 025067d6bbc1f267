"""The client's parts that need no server: the retry policy, the filter helpers, and what
importing the client loads."""
from __future__ import annotations

import subprocess
import sys

import pytest
from tritonclient.utils import InferenceServerException

from xmodal import store
from xmodal.client import Retry
from xmodal.retry import is_transient


def test_import_loads_neither_torch_nor_ray():
    code = ("import sys, xmodal.client; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_filter_helpers():
    assert store.equals_filter("style", 'say "hi" \\ bye') == 'style == "say \\"hi\\" \\\\ bye"'
    assert store.combine_filters("", None, 'style == "a"') == 'style == "a"'
    assert store.combine_filters('style == "a"', 'concept in ["x"]') == '(style == "a") and (concept in ["x"])'
    with pytest.raises(ValueError, match="invalid field name"):
        store.equals_filter("style or 1", "x")
    with pytest.raises(ValueError, match="control characters"):
        store.equals_filter("style", "a\x00b")


# -- retries -----------------------------------------------------------------------------------

class Flaky:
    """A function that fails with `error` `times` times, then returns "ok"."""

    def __init__(self, error: BaseException, times: int):
        self.error, self.times, self.calls = error, times, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return "ok"


def test_retry_backs_off_exponentially_on_transient_errors():
    slept = []
    policy = Retry(attempts=5, backoff=0.1, multiplier=2, max_delay=0.3, jitter=0)
    flaky = Flaky(InferenceServerException("model not ready", status="503"), times=4)
    assert policy.call(flaky, sleep=slept.append) == "ok"
    assert flaky.calls == 5 and slept == pytest.approx([0.1, 0.2, 0.3, 0.3])
    refused = Flaky(ConnectionRefusedError(111, "Connection refused"), times=10)
    with pytest.raises(ConnectionRefusedError):
        policy.call(refused, sleep=slept.append)
    assert refused.calls == 5
    jittered = Retry(backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay(1) <= 1.5 for _ in range(50))


@pytest.mark.parametrize("error", [InferenceServerException("bad input", status="400"),
                                   InferenceServerException("no such model", status="404"),
                                   ValueError("k"), TimeoutError("timed out")])
def test_retry_never_repeats_permanent_errors(error):
    flaky = Flaky(error, times=1)
    with pytest.raises(type(error)):
        Retry(attempts=4).call(flaky, sleep=lambda _: None)
    assert flaky.calls == 1 and not is_transient(error)


def test_async_retry():
    import asyncio

    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"

    assert asyncio.run(Retry(jitter=0).acall(flaky, sleep=sleep)) == "ok"
    assert len(calls) == 3 and slept == pytest.approx([0.1, 0.2])
