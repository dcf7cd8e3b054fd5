"""Run a test's worker in several threads and collect what they raise (an exception in a thread
would otherwise be lost with it, and the test would pass)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(worker: Callable[[int], object], n: int) -> list[BaseException]:
    """``worker(w)`` for w = 0..n−1, each in its own thread; returns every exception raised."""
    errors: list[BaseException] = []

    def guarded(w: int) -> None:
        try:
            worker(w)
        except BaseException as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
