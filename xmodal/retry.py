"""Retries with exponential backoff for calls to Triton, sync and asyncio.

Only *transient* failures are retried: the connection was refused, reset, aborted or closed
by the server (a restart, a stale keep-alive connection), or the server answered HTTP 503 /
UNAVAILABLE (a model still loading, an overloaded server). Everything else fails at once:
4xx answers (bad input, unknown model), validation errors, and timeouts, whose budget the
caller has already spent waiting. Embedding requests are pure functions of their input, so
sending one again is safe.

Attempt n (counting from 1) that fails transiently is followed by a sleep of
``min(max_delay, backoff * multiplier ** (n - 1))``, scaled by a random factor in
``[1 - jitter, 1 + jitter]`` so that many clients do not retry in step; with the defaults
(4 attempts, 0.1 s, x2, at most 2 s, ±10 %) a call gives up after about 0.7 s of sleeping.
"""
from __future__ import annotations

import asyncio
import errno
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from tritonclient.utils import InferenceServerException

T = TypeVar("T")

# HTTP and gRPC spellings of "unavailable" in InferenceServerException.status().
TRANSIENT_STATUSES = frozenset({"503", "UNAVAILABLE", "StatusCode.UNAVAILABLE"})
TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})
# Connection closed by the peer before an answer: geventhttpclient, aiohttp, http.client.
TRANSIENT_NAMES = frozenset({"HTTPConnectionClosed", "ServerDisconnectedError", "RemoteDisconnected"})


def is_transient(exc: BaseException) -> bool:
    """Whether a failed Triton call may succeed when sent again (see the module docstring)."""
    if isinstance(exc, InferenceServerException):
        return str(exc.status()) in TRANSIENT_STATUSES
    if isinstance(exc, TimeoutError):  # socket and asyncio timeouts, aiohttp's ServerTimeoutError
        return False
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return True
    if type(exc).__name__ in TRANSIENT_NAMES:
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:  # aiohttp's ClientOSError carries errno
        return True
    inner = getattr(exc, "os_error", None)  # aiohttp's ClientConnectorError wraps the socket error
    return isinstance(inner, BaseException) and inner is not exc and is_transient(inner)


def describe(exc: BaseException) -> str:
    """``Type: message``; Triton's errors keep their status (``[503] ...``)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass(frozen=True)
class Retry:
    """How often and how patiently to retry a transient failure; ``Retry(attempts=1)`` never retries."""

    attempts: int = 4  # tries in all, the first included
    backoff: float = 0.1  # seconds before the second try
    multiplier: float = 2.0
    max_delay: float = 2.0
    jitter: float = 0.1  # ± this fraction of each delay, at random

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be a positive integer, got {self.attempts!r}")
        if self.backoff < 0 or self.multiplier < 1 or self.max_delay < 0 or not 0 <= self.jitter < 1:
            raise ValueError("backoff and max_delay must be >= 0, multiplier >= 1 and 0 <= jitter < 1")

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number `attempt` (1-based)."""
        base = min(self.max_delay, self.backoff * self.multiplier ** (attempt - 1))
        return base * (1 + random.uniform(-self.jitter, self.jitter)) if self.jitter else base

    def call(self, fn: Callable[..., T], *args: Any, sleep: Callable[[float], Any] = time.sleep,
             on_retry: Callable[[BaseException, int, float], Any] | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, sent again after transient failures; the last failure is raised."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == self.attempts or not is_transient(exc):
                    raise
                pause = self.delay(attempt)
                if on_retry is not None:
                    on_retry(exc, attempt, pause)
                sleep(pause)
        raise AssertionError("unreachable")

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any,
                    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                    on_retry: Callable[[BaseException, int, float], Any] | None = None, **kwargs: Any) -> T:
        """The asyncio twin of :meth:`call`: awaits ``fn(*args, **kwargs)``."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                if attempt == self.attempts or not is_transient(exc):
                    raise
                pause = self.delay(attempt)
                if on_retry is not None:
                    on_retry(exc, attempt, pause)
                await sleep(pause)
        raise AssertionError("unreachable")


DEFAULT_RETRY = Retry()


def unavailable(url: str, what: str, exc: BaseException, retry: Retry) -> ConnectionError:
    """The ConnectionError raised when a transient failure outlasted every attempt."""
    tries = f"{retry.attempts} attempts" if retry.attempts > 1 else "1 attempt"
    return ConnectionError(f"Triton at {url} did not answer {what} ({tries}): {describe(exc)}")


def none_answered(failed: list[tuple[str, BaseException]], what: str, retry: Retry) -> ConnectionError:
    """The ConnectionError raised when every server of a list (`failed`: each with its last
    transient failure) outlasted its attempts; one server's is ``unavailable``'s."""
    if len(failed) == 1:
        url, exc = failed[0]
        return unavailable(url, what, exc, retry)
    return ConnectionError(f"no Triton server answered {what}: " + "; ".join(
        str(unavailable(url, what, exc, retry)) for url, exc in failed))
