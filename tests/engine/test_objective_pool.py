"""Model calls of different threads run in parallel on copies of the module (engine.models.objective):
each thread holds its own copy for a call, nested calls reuse it, and no more copies are made
than the pool's size. (That the answers equal the serial ones under 8 threads is checked in
test_queries.test_concurrent_queries_agree_with_serial_ones.)"""

from __future__ import annotations

import threading

import torch
from torch import nn

from engine.models.objective import ModulePool
from tests.threads import run_in_threads


def test_threads_hold_different_copies_at_the_same_time() -> None:
    model = nn.Linear(3, 2)
    pool = ModulePool(model, size=2)
    both_inside = threading.Barrier(2, timeout=10)  # raises if the second thread is kept out
    held: dict[int, nn.Module] = {}

    def worker(w: int) -> None:
        with pool.hold() as m:
            with pool.hold() as again:  # nested: the same copy, no second one taken
                assert again is m
            held[w] = m
            both_inside.wait()

    assert run_in_threads(worker, 2) == []
    assert held[0] is not held[1] and model not in held.values()
    assert torch.equal(held[0].weight, model.weight)  # copies of the module


def test_no_more_copies_than_the_size() -> None:
    pool = ModulePool(nn.Linear(3, 2), size=2)
    seen: set[int] = set()
    lock = threading.Lock()

    def worker(_: int) -> None:
        for _ in range(50):
            with pool.hold() as m, lock:
                seen.add(id(m))

    assert run_in_threads(worker, 6) == []
    assert 1 <= len(seen) <= 2


def test_copies_hold_no_weights_of_their_own() -> None:
    """A thread's copy keeps the trainable parameters (always passed to functional_call) as meta
    tensors and shares frozen parameters and buffers: its answers equal the module's own, and
    the copies of a 1M-parameter model (one per thread, up to the pool's size) cost no parameter
    memory."""
    from engine.models.losses import make_loss
    from engine.models.objective import POOL_SIZE, Objective

    torch.manual_seed(0)
    frozen = nn.Linear(6, 1000)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, nn.BatchNorm1d(1000), nn.Tanh(), nn.Linear(1000, 1000), nn.Tanh(),
                          nn.Linear(1000, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)  # buffers that matter for the answer
    obj = Objective(model, make_loss("mlp", svm_temperature=0.01), device=torch.device("cpu"),
                    dtype=torch.float64)
    theta = obj.flat_params()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    copies = []
    barrier = threading.Barrier(POOL_SIZE, timeout=10)

    def worker(_: int) -> None:
        with obj.holding() as module:
            copies.append(module)
            barrier.wait()  # every thread holds a copy at once
            torch.testing.assert_close(obj.logits(theta, x).detach(), want)

    assert run_in_threads(worker, POOL_SIZE) == []
    assert len({id(m) for m in copies}) == POOL_SIZE and model not in copies
    for m in copies:
        assert m[3].weight.device.type == "meta" and m[5].bias.device.type == "meta"
        assert m[0].weight is frozen.weight and m[1].running_mean is model[1].running_mean
