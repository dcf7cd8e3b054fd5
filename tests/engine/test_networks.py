"""Networks at scale, end to end through engine.build: --params, --projection kronecker, the
fisher and ekfac curvatures, the auto method, float32 networks, the resnet, and the build plan.
Each against an independent float64 reference (torch.func over the tracked parameters, a dense
Fisher solve, the full-space EK-FAC)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, hessian, vmap

import engine
from engine.config import IHVPMethod, ModelKind, TrainConfig
from engine.plan import auto_method

SMALL = TrainConfig(epochs=20, polish_s=0, channels=(4, 8), hidden=(16,))  # no polish: a time budget is not reproducible
F64 = {"progress": False, "dtype": "float64", "train": SMALL}
DIGITS = {"train_size": 300, "test_size": 40}  # images (8×8) for the convolutional tests


@pytest.fixture(scope="module")
def mlp_fc(tmp_path_factory: pytest.TempPathFactory, blobs_npz: Path) -> engine.Run:
    """Last-layer influence (Koh & Liang's ``fc``): only module '3' (the last Linear) is tracked."""
    return engine.build(str(blobs_npz), "mlp", tmp_path_factory.mktemp("r") / "fc", params="3",
                        ihvp="exact", **F64)


def test_params_restrict_theta_and_scores_match_a_torch_func_reference(mlp_fc: engine.Run) -> None:
    run = mlp_fc
    module = run.model.objective.model
    tracked = dict(module[3].named_parameters(prefix="3"))
    assert run.model.n_params == sum(p.numel() for p in tracked.values()) < run.info.raw["model"]["n_params_all"]
    assert run.info.raw["model"]["tracked"]["patterns"] == "3"
    lam = run.config.weight_decay
    x, y = run.data.x_train, run.data.y_train
    names = list(tracked)
    theta = {k: v.detach() for k, v in tracked.items()}

    def loss(params: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(module, params, (xb,)), yb)

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([d[k].reshape(-1) for k in names])

    def objective(vec: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, vec.split([theta[k].numel() for k in names])))
        params = {k: parts[k].view_as(theta[k]) for k in names}
        return loss(params, x, y) + 0.5 * lam * vec @ vec

    h = hessian(objective)(flat(theta))  # (p, p)
    g = vmap(lambda xi, yi: flat(grad(loss)(theta, xi[None], yi[None])))(x, y)  # (n, p)
    gt = vmap(lambda xi, yi: flat(grad(loss)(theta, xi[None], yi[None])))(run.data.x_test[:3],
                                                                        run.data.y_test[:3])
    want = -(g @ torch.linalg.solve(h, gt.T)).detach().numpy()  # (n, 3)
    np.testing.assert_allclose(run.scores([0, 1, 2]), want, rtol=1e-7, atol=1e-10 * np.abs(want).max())


def test_a_params_run_reopens_with_its_fixed_parameters(mlp_fc: engine.Run) -> None:
    again = engine.open_run(mlp_fc.path)
    assert torch.equal(again.model.theta, mlp_fc.model.theta)
    np.testing.assert_array_equal(again.scores([4]), mlp_fc.scores([4]))


def test_fisher_equals_the_dense_formula_of_the_store(blobs_npz: Path, tmp_path: Path) -> None:
    run = engine.build(str(blobs_npz), "mlp", tmp_path / "f", project=24, projection="kronecker",
                       **F64)
    assert run.config.ihvp is IHVPMethod.FISHER  # auto on a projected store
    g = run.store.resident.data.double()  # (n, K)
    n, k = g.shape
    fisher = g.T @ g / n + run.config.weight_decay * torch.eye(k, dtype=torch.float64)
    t = run.queries.test_gradients([0, 1]).double()  # (2, K)
    want = -(g @ torch.linalg.solve(fisher, t.T)).numpy()
    np.testing.assert_allclose(run.scores([0, 1]), want, rtol=1e-8, atol=1e-12 * np.abs(want).max())


def test_kronecker_store_rows_are_what_a_query_computes(tmp_path: Path) -> None:
    """A training point's store row equals the query path's gradient of the same point: the
    build and the queries project in the same space (same split, same seed)."""
    run = engine.build("digits", "cnn", tmp_path / "k", project=40, projection="kronecker",
                       **DIGITS, **F64)
    x, y = run.data.x_train[:5], run.data.y_train[:5]
    again = engine.open_run(run.path)
    got = again.queries.input_gradients(x, y)
    torch.testing.assert_close(got, run.store.resident.data[:5], rtol=1e-10, atol=1e-12)
    assert run.store.manifest["projection"]["kind"] == "kronecker"
    assert sum(b["k"] for b in run.store.manifest["projection"]["split"]["blocks"]) == run.store.space.dim


def test_ekfac_in_a_full_rank_kronecker_space_equals_the_full_space_ekfac(tmp_path: Path) -> None:
    """With K = p the per-layer Kronecker factors are square rotations, and EK-FAC is invariant to
    them: the projected run's EK-FAC scores equal the unprojected run's."""
    full = engine.build("digits", "cnn", tmp_path / "full", ihvp="ekfac", **DIGITS, **F64)
    p = full.model.n_params
    kron = engine.build("digits", "cnn", tmp_path / "kron", ihvp="ekfac", project=p,
                        projection="kronecker", **DIGITS, **F64)
    assert kron.store.space.dim == p
    a, b = full.scores([0, 1, 2]), kron.scores([0, 1, 2])
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9 * np.abs(a).max())
    report = full.explain(0)["ihvp"]
    assert report["method"] == "ekfac" and report["diagnostics"]["max_relative_residual"] < 1e-8


def test_auto_picks_a_method_for_the_models_size() -> None:
    assert auto_method(kind=ModelKind.LOGREG, n_params=7850, n_train=2000, projected=False,
                       linear=True) is IHVPMethod.EXACT
    assert auto_method(kind=ModelKind.MLP, n_params=2410, n_train=1297, projected=False,
                       linear=False) is IHVPMethod.EXACT
    assert auto_method(kind=ModelKind.CNN, n_params=11642, n_train=5000, projected=False,
                       linear=False) is IHVPMethod.EKFAC  # CG at an indefinite θ̂ did not converge
    assert auto_method(kind=ModelKind.LOGREG, n_params=20_000, n_train=5000, projected=False,
                       linear=True) is IHVPMethod.CG
    assert auto_method(kind=ModelKind.RESNET, n_params=700_000, n_train=5000, projected=False,
                       linear=False) is IHVPMethod.EKFAC
    assert auto_method(kind=ModelKind.USER, n_params=11_000_000, n_train=5000, projected=True,
                       linear=False) is IHVPMethod.FISHER


def test_networks_default_to_float32_and_convex_models_to_float64(blobs_npz: Path, tmp_path: Path) -> None:
    """float32 for networks unless --dtype float64 (the contract); auto then picks cg, not the
    exact Hessian, whose small eigenvalues float32 cannot resolve; convex models in float64."""
    net = engine.build(str(blobs_npz), "mlp", tmp_path / "m", progress=False, train=SMALL)
    f64 = engine.build(str(blobs_npz), "mlp", tmp_path / "s", progress=False, train=SMALL, dtype="float64")
    lin = engine.build(str(blobs_npz), "logreg", tmp_path / "l", progress=False)
    assert net.model.dtype == torch.float32 and lin.model.dtype == torch.float64
    assert net.info.raw["plan"]["ihvp_requested"] == "auto" and net.config.ihvp is IHVPMethod.EKFAC
    assert f64.model.dtype == torch.float64 and f64.config.ihvp is IHVPMethod.EXACT
    assert lin.config.ihvp is IHVPMethod.EXACT
    assert net.info.training["iterations"]["epochs"] == SMALL.epochs


def test_a_resnet_trains_with_batchnorm_and_is_explained_in_eval_mode(tmp_path: Path) -> None:
    tc = TrainConfig(epochs=2, width=4, polish_s=2, lbfgs_steps=5)
    run = engine.build("digits", "resnet", tmp_path / "r", project=64, projection="kronecker",
                       train=tc, progress=False, train_size=400, test_size=100,
                       weight_decay=1e-2)  # 2 epochs: the stronger λ settles BatchNorm's statistics sooner
    module = run.model.objective.model
    assert not module.training
    bn = module.bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # statistics were learnt
    assert run.info.training["test_accuracy"] > 0.3
    out = run.explain(0, top=3)
    assert len(out["helpful"]) == 3 and out["ihvp"]["method"] == "fisher"


def test_the_plan_refuses_a_build_the_machine_cannot_hold(blobs_npz: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.plan

    monkeypatch.setattr(engine.plan, "available_memory", lambda: 50_000)
    with pytest.raises(engine.InfluenceError, match="memory"):
        engine.build(str(blobs_npz), "mlp", tmp_path / "big", progress=False, train=SMALL, ihvp="exact")
    assert not (tmp_path / "big").exists() and not (tmp_path / ".big.partial").exists()


def test_on_a_gpu_the_plan_holds_a_build_to_the_gpu_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.plan
    from engine.plan import BuildPlan, Stage, memory_limit

    monkeypatch.setattr(engine.plan, "available_memory", lambda: 64 * 10**9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 10**9, 80 * 10**9))
    gpu = torch.device("cuda", 0)
    assert memory_limit(gpu) == (2 * 10**9, "GPU memory (cuda:0)")
    assert memory_limit(torch.device("cpu")) == (64 * 10**9, "memory")  # the host's on the CPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * 10**9, 80 * 10**9))
    assert memory_limit(gpu) == (64 * 10**9, "memory")  # the smaller of the two
    limit, where = 2 * 10**9, "GPU memory (cuda:0)"
    plan = BuildPlan(ihvp=IHVPMethod.FISHER, ihvp_requested="auto", n_params=11_173_962, store_dim=11_173_962,
                     store_bytes=0, forward_backward_s=0.01, available_bytes=limit, available_where=where,
                     stages=(Stage("gradients", 60.0, 22 * 10**9, "per-sample gradients (chunk, p) whole"),))
    with pytest.raises(engine.InfluenceError, match=r"22.0 GB of GPU memory \(cuda:0\) and 2.0 GB is available"):
        plan.check()
    assert plan.lines()[-1].endswith("of 2.0 GB GPU memory (cuda:0) available")


def test_methods_that_do_not_fit_the_store_are_refused(blobs_npz: Path, tmp_path: Path) -> None:
    with pytest.raises(engine.InfluenceError, match="full gradients"):
        engine.build(str(blobs_npz), "mlp", tmp_path / "a", project=8, ihvp="cg", **F64)
    with pytest.raises(engine.InfluenceError, match="kronecker"):
        engine.build(str(blobs_npz), "mlp", tmp_path / "b", project=8, ihvp="ekfac", **F64)
    with pytest.raises(engine.InfluenceError, match="--project K"):
        engine.build(str(blobs_npz), "mlp", tmp_path / "c", projection="kronecker", **F64)
