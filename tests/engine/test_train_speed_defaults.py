"""Network training (engine.models.train): the stopping criterion, the thread cap, the in-place
module path against the flat-θ functional reference, the coupled L2 term, and the polish budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from engine.models.losses import cross_entropy
from engine.models.objective import Objective
from engine.models.threads import auto_threads, intra_op_threads
from engine.models.train import (
    _epochs,
    _flat_epochs,
    lbfgs,
    objective_value_and_grad,
    planned_epochs,
    stopping_rule,
    train_convex,
    train_network,
)

LAM = 1e-2


def blobs(n: int = 150, d: int = 6, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(c, d, generator=g, dtype=torch.float64)  # (c, d)
    y = torch.randint(0, c, (n,), generator=g)  # (n,)
    x = centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64)  # (n, d)
    return x, y


def mlp_objective(seed: int = 0, dtype: torch.dtype = torch.float64) -> Objective:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return Objective(model, cross_entropy, device=torch.device("cpu"), dtype=dtype)


def test_planned_epochs_cap_the_per_sample_gradients() -> None:
    tc = TrainConfig(epochs=150, max_samples=300_000)
    assert planned_epochs(tc, 1_000) == 150  # small data: the epoch cap
    assert planned_epochs(tc, 5_000) == 60
    assert planned_epochs(tc, 60_000) == 5
    assert planned_epochs(tc, 1_000_000) == 1  # at least one epoch
    assert planned_epochs(dataclasses.replace(tc, max_samples=0), 60_000) == 150  # no cap
    for n in (1, 7, 999, 5_000, 123_457):
        assert planned_epochs(tc, n) * n <= max(tc.max_samples + n, n)
    rule = stopping_rule(tc, 5_000)
    assert rule.startswith("60 epochs of adam") and "cosine" in rule and "L-BFGS" in rule
    assert "no polish" in stopping_rule(dataclasses.replace(tc, polish_s=0), 5_000)


def test_intra_op_threads_caps_and_restores() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1) as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(before + 7) as used:  # never raises the count
        assert used == before == torch.get_num_threads()
    with intra_op_threads(0) as used:
        assert used == min(auto_threads(), before)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_module_epochs_equal_the_flat_functional_reference(optimizer: str) -> None:
    """Training the module's own tensors in place (optimiser weight decay λ) follows the same
    path as training one flat θ through ``Objective.mean_loss`` (the previous implementation):
    same minibatches, same steps, float64."""
    x, y = blobs()
    tc = TrainConfig(epochs=5, batch_size=32, optimizer=optimizer, polish_s=0)
    fast, ref = mlp_objective(), mlp_objective()
    assert torch.equal(fast.flat_params(), ref.flat_params())
    la = _epochs(fast, x, y, weight_decay=LAM, config=tc, epochs=5,
                 gen=torch.Generator().manual_seed(3), epoch_bar=None)
    lb = _flat_epochs(ref, x, y, weight_decay=LAM, config=tc, epochs=5,
                      gen=torch.Generator().manual_seed(3), epoch_bar=None)
    torch.testing.assert_close(fast.flat_params(), ref.flat_params(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-9, atol=1e-12)
    assert la[-1] < la[0]  # it learnt something


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_l2_term_is_coupled_so_training_reaches_the_optimum_of_r(optimizer: str) -> None:
    """On a convex objective the epochs (cosine to 0) reach the optimum of R(θ) = mean CE +
    (λ/2)‖θ‖² that Newton finds (λ = 0.5: strongly convex, so a short run gets there); without
    the L2 term, or with AdamW's decoupled decay (λ·lr per step), they would stop far from it."""
    x, y = blobs()
    lam = 0.5
    model = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    exact = train_convex(Objective(model, cross_entropy, device=torch.device("cpu"), dtype=torch.float64),
                         x, y, weight_decay=lam)
    obj = Objective(nn.Sequential(nn.Linear(6, 3)), cross_entropy, device=torch.device("cpu"),
                    dtype=torch.float64)
    res = train_network(obj, x, y, weight_decay=lam, seed=0, config=TrainConfig(
        epochs=100, max_samples=0, batch_size=50, polish_s=0, optimizer=optimizer))
    assert res.iterations["lbfgs_evals"] == 0
    assert float((res.theta - exact.theta).norm()) < 2e-2 * float(exact.theta.norm())
    assert res.objective - exact.objective < 1e-4


def test_train_network_is_deterministic_and_reports_its_stopping() -> None:
    x, y = blobs()
    tc = TrainConfig(epochs=400, max_samples=1_500, batch_size=32, polish_s=0, threads=1)
    a = train_network(mlp_objective(), x, y, weight_decay=LAM, config=tc, seed=4)
    b = train_network(mlp_objective(), x, y, weight_decay=LAM, config=tc, seed=4)
    assert torch.equal(a.theta, b.theta)
    assert a.iterations["epochs"] == 10 == len(a.iterations["epoch_losses"])  # ⌈1,500 / 150⌉
    assert a.iterations["threads"] == 1
    value, g = objective_value_and_grad(mlp_objective(), a.theta, x, y, weight_decay=LAM)
    assert a.objective == pytest.approx(value) and a.grad_norm == pytest.approx(float(g.norm()))


def test_the_polish_budget_is_checked_before_every_evaluation() -> None:
    """With no time left after the first evaluation, L-BFGS stops there and returns the best
    point it evaluated: the start."""
    x, y = blobs()
    obj = mlp_objective()
    theta = obj.flat_params()
    out, evals = lbfgs(obj, theta, x, y, weight_decay=LAM, steps=500, budget_s=0.0)
    assert evals == 1 and torch.equal(out, theta)
    more, evals = lbfgs(obj, theta, x, y, weight_decay=LAM, steps=20, budget_s=60.0)
    v0, _ = objective_value_and_grad(obj, theta, x, y, weight_decay=LAM)
    v1, _ = objective_value_and_grad(obj, more, x, y, weight_decay=LAM)
    assert evals > 1 and v1 < v0


def test_batchnorm_modules_train_in_train_mode_and_end_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    obj = Objective(model, cross_entropy, device=torch.device("cpu"), dtype=torch.float64)
    x, y = blobs()
    train_network(obj, x, y, weight_decay=LAM, seed=0, config=TrainConfig(epochs=2, polish_s=0))
    assert not model.training
    assert not torch.equal(model[1].running_mean, torch.zeros(8))  # batch statistics were learnt


def test_the_polish_is_skipped_when_one_evaluation_would_exceed_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget smaller than one epoch's time cannot hold a full-batch evaluation: no L-BFGS
    evaluation runs, the result says so, and θ̂ is the epochs' θ."""
    from engine.models import train as train_mod

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    y = torch.randint(0, 3, (200,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    obj = Objective(model, cross_entropy, device=torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setattr(train_mod, "POLISH_FLOOR_S", 0.0)
    config = TrainConfig(epochs=3, polish_s=1e-9, polish_share=1e-9, lbfgs_steps=50)
    res = train_mod.train_network(obj, x, y, weight_decay=1e-2, config=config, seed=0)
    assert res.iterations["polish_skipped"] is True and res.iterations["lbfgs_evals"] == 0
    config = TrainConfig(epochs=3, polish_s=30.0, polish_share=1.0, lbfgs_steps=5)
    res = train_mod.train_network(obj, x, y, weight_decay=1e-2, config=config, seed=0)
    assert res.iterations["polish_skipped"] is False and res.iterations["lbfgs_evals"] > 0


def test_denormals_are_flushed_inside_the_compute_context_and_restored_after() -> None:
    from engine.models.threads import flushing_denormals

    torch.set_flush_denormal(False)
    assert not flushing_denormals()  # 1e-39 is representable (denormal) in float32
    with intra_op_threads(1):
        assert flushing_denormals()
        tiny = torch.full((4,), 1e-30, dtype=torch.float32) * 1e-10  # (4,) would be 1e-40
        assert bool((tiny == 0).all())
    assert not flushing_denormals()


def test_every_intra_op_thread_flushes_denormals_and_gets_its_mode_back() -> None:
    # the flag is per thread: set on the calling thread alone, a 2-thread op on denormal inputs
    # came out half flushed (the calling thread's half zero, the OpenMP worker's half not)
    import sklearn.datasets  # noqa: F401 - its own libgomp copy in the process (a digits build loads it)

    from engine.models.threads import set_flush_denormal_everywhere

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        set_flush_denormal_everywhere(False)
        tiny = torch.full((1_000_000,), 1e-39, dtype=torch.float32)  # denormal; split over 2 threads
        assert bool((tiny * 0.5 != 0).all())
        with intra_op_threads(2) as used:
            assert used == 2
            inside = tiny * 0.5
        assert int((inside != 0).sum()) == 0  # every thread's share flushed
        assert bool((tiny * 0.5 != 0).all())  # and every thread back to not flushing
    finally:
        torch.set_num_threads(before)


def test_weight_decay_defaults_by_model_kind_and_an_explicit_value_wins() -> None:
    from engine.config import NETWORK_WEIGHT_DECAY, WEIGHT_DECAY, BuildConfig
    from engine.options import add_build_options, build_kwargs

    for model in ("mlp", "cnn", "resnet"):
        assert BuildConfig(data="digits", model=model).weight_decay == NETWORK_WEIGHT_DECAY == 5e-4
    for model in ("logreg", "svm", "pkg.mod:factory", "model.ts"):
        assert BuildConfig(data="digits", model=model).weight_decay == WEIGHT_DECAY == 1e-2
    assert BuildConfig(data="digits", model="cnn", weight_decay=0.03).weight_decay == 0.03
    again = BuildConfig.from_dict(BuildConfig(data="digits", model="cnn").to_dict())
    assert again.weight_decay == 5e-4  # recorded resolved, read back as recorded
    import argparse

    ap = argparse.ArgumentParser()
    add_build_options(ap)
    args = ap.parse_args(["--data", "digits", "--model", "cnn", "--out", "x"])
    assert BuildConfig(data="digits", model="cnn", **{k: v for k, v in build_kwargs(args).items()
                                                     if k == "weight_decay"}).weight_decay == 5e-4


def test_the_plan_estimates_the_polish_budget_training_keeps_to(monkeypatch: pytest.MonkeyPatch) -> None:
    # the plan once left out the budget's floor: the demo's plan said "polish ≤ 1 s" and the
    # polish took its 10 s
    from engine.config import BuildConfig
    from engine.models.train import POLISH_FLOOR_S, polish_budget
    from engine.plan import _training_stage

    x, y = blobs(n=100)
    obj = mlp_objective()
    for fb_s, polish_s, expect in [(1e-4, 10.0, "polish ≤ 10 s"),  # short epochs: the floor
                                   (1e-2, 600.0, "polish ≤ 38 s"),  # a quarter of 150 epochs of 1 s
                                   (1.0, 30.0, "polish skipped")]:  # an epoch of 100 s outlasts 30 s
        monkeypatch.setattr("engine.plan.forward_backward_seconds", lambda *_a, s=fb_s: s)
        config = BuildConfig(data="blobs", model="mlp", train=TrainConfig(epochs=150, polish_s=polish_s))
        stage = _training_stage(config, obj, x, y, convex=False, fb=fb_s)
        epochs_s = planned_epochs(config.train, 100) * 100 * fb_s
        budget = polish_budget(config.train, epochs_s=epochs_s)
        assert budget == min(polish_s, max(0.25 * epochs_s, POLISH_FLOOR_S))
        assert expect in stage.note, stage.note
        assert stage.seconds == pytest.approx(epochs_s + (0.0 if "skipped" in expect else budget))
