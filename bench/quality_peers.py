"""The peer libraries' attributions for bench/quality_bench.py, run in their own venv.

Run by quality_bench.py as a subprocess of ``bench/.venv-quality/bin/python`` (the engine's venv has
no peer library): ``quality_peers.py REQUEST.json``. The request names the base run folder (θ̂, the
data and the loss are taken from it through ``engine.open_run``, with the repository root on the
import path, so the peers see the very same model, training data and test points as our methods),
a ``.npy`` of test ids, the peer and its settings, and the ``.npz`` to write: ``raw`` (the peer's own
scores, in its own layout and sign) and ``seconds`` (the peer's fit + scores, model wrapping
included; opening the run and importing the library are outside the clock).

Peers and what their ``raw`` means (the conversion to our I_up,loss is quality_bench.PEERS):

- ``kronfluence`` 1.0.1 EK-FAC: ``+g_testᵀ (EKFAC + (λ+δ)I)⁻¹ g_i`` (positive = helpful), shape
  (T, n_train); empirical Fisher, factors and scores in the run's dtype, ``damping_factor`` = λ + δ.
- ``trak`` (traker 0.3.2): TRAK with one checkpoint (θ̂ itself), its ``BasicProjector`` (Gaussian,
  the CPU projector; its CUDA ``fast_jl`` needs a GPU build) to ``proj_dim`` (at most n_train / 2:
  with K ≥ n_train its unregularised ΦᵀΦ is singular and the scores are noise), float32 features
  (``use_half_precision=False``); attributions to the test margin, positive = helps the prediction,
  shape (n_train, T).
- ``tracin`` (captum 0.9.0 ``TracInCP``): one checkpoint (θ̂, learning rate 1), every layer,
  ``g_testᵀ g_i`` of the summed cross-entropy (positive = proponent = helpful), shape (T, n_train).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the engine, without installing it into this venv

import engine

BATCH = 256  # training points per batch, every peer
DIST = {"kronfluence": "kronfluence", "trak": "traker", "tracin": "captum"}  # peer -> distribution
MODULE = {"kronfluence": "kronfluence.analyzer", "trak": "trak", "tracin": "captum.influence"}


def _module(run: Any) -> nn.Module:
    """The run's network at θ̂, in eval mode, with an ``nn.Sequential`` root (kronfluence needs a
    container root: a bare ``nn.Linear`` recurses)."""
    obj = run.model.objective
    obj.load_flat(run.model.theta)
    module = obj.model.eval()
    return module if isinstance(module, nn.Sequential) else nn.Sequential(module)


def kronfluence_raw(module: nn.Module, train: TensorDataset, test: TensorDataset, *, damping: float,
                    dtype: torch.dtype, folder: Path) -> np.ndarray:
    """kronfluence's EK-FAC pairwise scores (T, n_train), positive = helpful."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = Classification()
    model = prepare_model(module, task)
    analyzer = Analyzer(analysis_name="quality", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(folder))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=dtype,
                                  gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
                                  per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=BATCH,
                             factor_args=factor_args, overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                score_dtype=dtype)
    analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=test,
                                     train_dataset=train, per_device_query_batch_size=len(test),
                                     per_device_train_batch_size=BATCH, score_args=score_args,
                                     overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("pairwise")["all_modules"].double().numpy()  # (T, n_train)


def trak_raw(module: nn.Module, train: TensorDataset, test: TensorDataset, *, proj_dim: int, seed: int,
             folder: Path) -> np.ndarray:
    """TRAK's scores (n_train, T) with one checkpoint (θ̂) on its CPU projector."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    module = module.float()  # TRAK computes its features in float32 (or float16)
    proj_dim = min(proj_dim, len(train) // 2)  # ΦᵀΦ (K, K) is singular when K ≥ n_train (lambda_reg 0)
    n_params = sum(p.numel() for p in module.parameters())
    projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.normal,
                               device=torch.device("cpu"))
    # a fresh folder; load_from_save_dir=True is what creates its experiments.json
    traker = TRAKer(model=module, task="image_classification", train_set_size=len(train), save_dir=str(folder),
                    load_from_save_dir=True, device="cpu", projector=projector, use_half_precision=False,
                    logging_level=logging.WARNING)
    checkpoint = module.state_dict()
    traker.load_checkpoint(checkpoint, model_id=0)
    xs, ys = (t.float() if t.is_floating_point() else t for t in train.tensors)
    for s in range(0, len(xs), BATCH):
        traker.featurize(batch=(xs[s : s + BATCH], ys[s : s + BATCH]), num_samples=len(xs[s : s + BATCH]))
    traker.finalize_features()
    xt, yt = test.tensors
    traker.start_scoring_checkpoint(exp_name="quality", checkpoint=checkpoint, model_id=0, num_targets=len(xt))
    for s in range(0, len(xt), BATCH):
        traker.score(batch=(xt[s : s + BATCH].float(), yt[s : s + BATCH]), num_samples=len(xt[s : s + BATCH]))
    return np.asarray(traker.finalize_scores(exp_name="quality"), dtype=np.float64)  # (n_train, T)


def tracin_raw(module: nn.Module, train: TensorDataset, test: TensorDataset, *, folder: Path) -> np.ndarray:
    """captum TracInCP's influence (T, n_train) with θ̂ as the one checkpoint, positive = proponent."""
    from captum.influence import TracInCP

    path = folder / "theta.pt"
    torch.save(module.state_dict(), path)

    def load(model: nn.Module, ckpt: str) -> float:
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        return 1.0  # the learning rate TracIn weighs this checkpoint by

    only_lin_conv = all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules()
                        if next(m.parameters(recurse=False), None) is not None)
    # captum's per-batch sample-wise gradients cover Linear and Conv2d only; else its per-example loop
    tracin = TracInCP(module, train, checkpoints=[str(path)], checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum" if only_lin_conv else "none"), batch_size=BATCH,
                      sample_wise_grads_per_batch=only_lin_conv)
    return tracin.influence(test.tensors).double().numpy()  # (T, n_train)


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(request.get("threads") or torch.get_num_threads()))
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")  # kronfluence's GradScaler, captum's deprecations
    peer, settings = request["peer"], request.get("settings", {})
    if peer not in DIST:
        raise SystemExit(f"unknown peer {peer!r}: use {', '.join(DIST)}")
    importlib.import_module(MODULE[peer])  # imports off the clock
    run = engine.open_run(request["run"], device="cpu")
    test_ids = np.load(request["test_ids"])  # (T,)
    data, dtype = run.data, run.model.dtype
    train = TensorDataset(data.x_train.to(dtype), data.y_train)
    test = TensorDataset(data.x_test[test_ids].to(dtype), data.y_test[test_ids])
    module = _module(run)
    with tempfile.TemporaryDirectory(prefix=f"quality-{peer}-") as tmp:
        t = time.perf_counter()
        if peer == "kronfluence":
            raw = kronfluence_raw(module, train, test, damping=run.config.weight_decay + run.config.damping,
                                  dtype=dtype, folder=Path(tmp))
        elif peer == "trak":
            raw = trak_raw(module, train, test, proj_dim=int(settings.get("proj_dim", 2048)),
                           seed=int(settings.get("seed", 0)), folder=Path(tmp))
        else:
            raw = tracin_raw(module, train, test, folder=Path(tmp))
        seconds = time.perf_counter() - t
    np.savez(request["out"], raw=raw, seconds=seconds, version=version(DIST[peer]), torch=torch.__version__,
             load=os.getloadavg()[0])  # the machine's 1-minute load average as it finished
    print(f"{peer}: raw {raw.shape} in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
