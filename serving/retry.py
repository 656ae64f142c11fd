"""Retrying a restore whose replica died, within the request's deadline (pure asyncio, no Ray).

Restoring an image is idempotent, so a request lost with its replica (killed, out of memory, a
node gone) is sent again, to whichever replica the handle picks next, up to ``attempts`` times in
all. What counts as a lost replica is the caller's ``is_lost`` (for Ray Serve: the replica's actor
died or became unavailable); any other error is the request's own and is not retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mordasr.errors import MordasrError

T = TypeVar("T")

DEFAULT_ATTEMPTS = 3
DEFAULT_RETRY_AFTER_S = 2  # what a 503 tells the client to wait


class ReplicasUnavailable(MordasrError):
    """Every attempt went to a replica that died (503: try again after ``retry_after_s``)."""

    def __init__(self, attempts: int, reason: str) -> None:
        super().__init__(f"no replica could finish the request in {attempts} attempt(s): {reason}")
        self.attempts = attempts


class DeadlineExceeded(MordasrError):
    """The request's deadline passed before an attempt finished (504)."""

    def __init__(self, attempts: int, deadline_s: float) -> None:
        super().__init__(f"the request's deadline of {deadline_s:g} s passed after {attempts} attempt(s)")
        self.attempts = attempts


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_ATTEMPTS
    backoff_s: float = 0.2  # before the second attempt; doubled before each later one
    retry_after_s: int = DEFAULT_RETRY_AFTER_S


async def call_with_retries(call: Callable[[], Awaitable[T]], is_lost: Callable[[BaseException], bool],
                            policy: RetryPolicy = RetryPolicy(), deadline_s: float | None = None,
                            clock: Callable[[], float] = time.monotonic) -> tuple[T, int]:
    """``(await call(), attempts made)``; a lost replica's attempt is made again after a backoff.

    Raises ``ReplicasUnavailable`` when ``policy.attempts`` attempts were all lost, and
    ``DeadlineExceeded`` when ``deadline_s`` (seconds from now) passes first; the attempt in
    flight is then cancelled, so its work is dropped.
    """
    end = None if deadline_s is None else clock() + deadline_s
    backoff = policy.backoff_s
    for attempt in range(1, policy.attempts + 1):
        left = None if end is None else end - clock()
        if left is not None and left <= 0:
            raise DeadlineExceeded(attempt - 1, deadline_s or 0.0)
        try:
            return await asyncio.wait_for(call(), timeout=left), attempt
        except asyncio.TimeoutError:
            raise DeadlineExceeded(attempt, deadline_s or 0.0) from None
        except Exception as err:
            if not is_lost(err):
                raise
            if attempt == policy.attempts:
                raise ReplicasUnavailable(attempt, type(err).__name__) from None
        if end is not None and clock() + backoff >= end:
            raise DeadlineExceeded(attempt, deadline_s or 0.0)
        await asyncio.sleep(backoff)
        backoff *= 2
    raise AssertionError("unreachable")
