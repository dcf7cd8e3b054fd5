"""The engine's shared caches: bounded by bytes, keyed, locked per key.

Every cache that a query fills lives in one :class:`BoundedCache` per run (``Run.cache``), so the
memory a server can be made to spend through request parameters is bounded in one place:

==========================  ======================================  =================================
key                         value                                   grows with
==========================  ======================================  =================================
``("proba", split)``        class probabilities (n, C)              nothing (2 splits)
``("train-loss",)``         training losses (n,)                    nothing
``("grad-norm",)``          store-row norms (n,)                    nothing
``("self", method)``        self-influence (n,)                     the IHVP method (a closed set)
``("test-grads",)``         every test gradient (n_test, d)         nothing
``("knn-features", space)`` kNN index rows (n, f)                   the space (a closed set)
``("knn-index", …)``        a :class:`~engine.query.knn.KNNIndex`   space, metric, backend
``("knn-pool", size)``      FastIF pool ids and store rows          the ``pool`` request parameter
``("knn-grad-norm-order",)`` training ids by gradient norm          nothing
``("self-rank", method)``   ids by |self-influence| (app)          the IHVP method
``("kmeans", k, seed)``     cluster assignments (app)               ``clusters`` and ``seed``
==========================  ======================================  =================================

The budget (:data:`DEFAULT_BUDGET_BYTES`, 192 MiB, settable per run and by ``INFLUENCE_CACHE_MB``
when served) counts every entry; when an
insert would pass it, the least recently used entries are dropped first. An entry larger than the
whole budget is computed and returned but not kept. Each key has its own lock, so 16 threads asking
for the same missing key compute it once while other keys are computed concurrently; the cache's
own lock is held only for dictionary bookkeeping, never while computing.

Lock order (the only nesting in the engine): a per-key lock here may be held while the run's
solver bank (:class:`engine.solvers.SolverBank`) takes its own per-key lock, never the reverse.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["DEFAULT_BUDGET_BYTES", "BoundedCache", "nbytes_of"]

DEFAULT_BUDGET_BYTES = 192 << 20  # leaves room, within a served run's 256 MB, for what else a query keeps

T = TypeVar("T")


def nbytes_of(value: Any) -> int:
    """Bytes held by a cached value: arrays and tensors by size, containers summed, objects by
    their ``nbytes`` attribute (0 when they have none)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    return int(getattr(value, "nbytes", 0))


class BoundedCache:
    """A thread-safe least-recently-used cache with a byte budget and one lock per key."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()  # bookkeeping only
        self.nbytes = 0
        self.computed = 0  # how many values were computed (for tests and diagnostics)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def _hit(self, key: Hashable) -> tuple[bool, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False, None
            self._entries.move_to_end(key)
            return True, entry[0]

    def get(self, key: Hashable, compute: Callable[[], T], *, read_only: bool = True) -> T:
        """The cached value of ``key``, or ``compute()`` once (other threads asking for the same
        key wait for it). NumPy results are made read-only unless ``read_only`` is False."""
        found, value = self._hit(key)
        if found:
            return value
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            found, value = self._hit(key)
            if found:
                return value
            value = compute()
            if read_only and isinstance(value, np.ndarray):
                value.setflags(write=False)
            self._insert(key, value)
            return value

    def _insert(self, key: Hashable, value: Any) -> None:
        size = nbytes_of(value)
        with self._lock:
            self.computed += 1
            self._key_locks.pop(key, None)  # later misses make a new lock; waiters hold this one
            if size > self.budget_bytes:
                return  # computed and returned, never kept
            while self._entries and self.nbytes + size > self.budget_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.nbytes -= dropped
                self.evicted += 1
            self._entries[key] = (value, size)
            self.nbytes += size

    def resize(self, budget_bytes: int) -> None:
        """Set the budget, dropping least recently used entries until they fit."""
        with self._lock:
            self.budget_bytes = int(budget_bytes)
            while self._entries and self.nbytes > self.budget_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.nbytes -= dropped
                self.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
