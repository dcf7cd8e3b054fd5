"""LDS ± 95% CI and wall time of every attribution method, ours and the peers', on one table.

Case per model (``--models``, default ``logreg,cnn``; ``resnet`` is the built-in one at width
:data:`RESNET_WIDTH`): a seeded stratified Fashion-MNIST subset (``--train-size``/``--test-size``),
a base run built with the engine's own recipe (convex models to their exact optimum in float64;
networks ``--epochs`` of Adam then ≤ ``--polish-s`` s of L-BFGS, float32), and the LDS ground truth
``engine.lds.retrain_outputs(base, subsets=M, fraction=f, retraining="scratch")``: M models retrained
from scratch on seeded random halves, cached in the base run folder. Every method scores the same
``--tests`` test points (drawn as ``engine.lds.lds`` draws them) against the same θ̂, and its LDS
is ``engine.lds.lds_score`` of those scores on the same halves (loss and margin outputs).

Ours, each in a fresh subprocess (``--worker``), timed from the data to the scores (``engine.build``
+ ``run.scores``) with θ̂ given: networks are rebuilt as the user model ``quality_models:fmnist_cnn``
/ ``quality_bench:small_resnet`` from θ̂'s ``state_dict``; logreg retrains to its unique optimum and
its ``train_s`` is taken off. Ensembles (``ensemble=N``, networks) include training all N models.
Peers, in their own venv (``bench/quality_peers.py``: the same θ̂, data and test points through
``engine.open_run`` of the base run; fit + scores timed there), converted to our sign by
:data:`PEERS`. Every method runs under ``--method-timeout``; its scores and seconds are cached in
the work folder, so a rerun computes only what is missing (``--redo NAMES`` recomputes).

Set up the peers' venv (``bench/.venv-quality`` must be git-ignored) and run::

    python3 -m venv bench/.venv-quality
    bench/.venv-quality/bin/pip install torch==2.13.0                       # the CPU wheel on disk, FIRST
    bench/.venv-quality/bin/pip install torch==2.13.0 -r bench/quality-requirements.txt   # in ONE command
    bench/.venv-quality/bin/pip uninstall -y torchvision                    # a peer pulls it; it breaks, unused
    .venv/bin/python bench/quality_bench.py --quick                         # logreg smoke test, minutes
    .venv/bin/python bench/quality_bench.py --models cnn --train-size 5000 --subsets 20   # -> bench/results/
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_models as qm
from peers_lib import Convention, machine_info

RESULTS = ROOT / "bench" / "results" / "quality_bench.json"
WORK = ROOT / "runs" / "bench-quality"
PEER_PYTHON = ROOT / "bench" / ".venv-quality" / "bin" / "python"
DATA = "fashion-mnist"
RESNET_WIDTH = 8  # the "small resnet": the built-in ResNet-18-style network at base width 8
FACTORY = {"cnn": "quality_models:fmnist_cnn", "resnet": "quality_bench:small_resnet"}
NETWORKS = ("cnn", "resnet")
# per model kind: (λ, δ); --weight-decay / --damping override both
OBJECTIVE = {"logreg": (1e-2, 0.0), "cnn": (1e-3, 1e-3), "resnet": (1e-3, 1e-3)}
PEERS: dict[str, Convention] = {  # raw → ours: sign · raw, transposed when "test_train"
    "kronfluence": Convention(-1.0, False, "test_train", "+g_testᵀ(EKFAC+(λ+δ)I)⁻¹g_i, positive = helpful: −rawᵀ"),
    "trak": Convention(-1.0, False, "train_test", "TRAK margin attribution, positive = helpful: −raw"),
    "tracin": Convention(-1.0, False, "test_train", "TracInCP g_testᵀg_i, positive = proponent: −rawᵀ"),
}


def small_resnet(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The built-in ``resnet`` at width :data:`RESNET_WIDTH` (user-model factory)."""
    from engine.config import ModelKind, TrainConfig
    from engine.models.zoo import build_model

    return build_model(ModelKind.RESNET, input_shape=tuple(input_shape), n_classes=n_classes,
                       train=TrainConfig(width=RESNET_WIDTH), seed=0)


@dataclass(frozen=True)
class Method:
    """One row of the table: ``library`` "ours" (build options + the query's ``ihvp``) or a peer."""

    name: str
    library: str
    options: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ("logreg", "cnn", "resnet")
    ensemble: int = 0  # > 0: the built-in model trained this many times (engine.ensemble)


def methods(ks: list[int]) -> list[Method]:
    projected = [Method(f"{kind} K={k} {ihvp}", "ours", {"ihvp": ihvp, "project": k, "projection": kind})
                 for k in ks for kind, ihvp in (("dense", "fisher"), ("kronecker", "fisher"), ("kronecker", "ekfac"))]
    projected += [Method(f"kronecker-pca K={k} {ihvp}", "ours", {"ihvp": ihvp, "project": k, "projection": "kronecker",
                                                               "kronecker_basis": "pca"})
                  for k in ks for ihvp in ("fisher", "ekfac")]
    return [  # cheap ones first, so that a stop or a timeout leaves the most rows
        Method("exact", "ours", {"ihvp": "exact"}, models=("logreg",)),
        Method("ekfac", "ours", {"ihvp": "ekfac"}),
        Method("fisher", "ours", {"ihvp": "fisher"}),
        *projected,
        Method("kronfluence ekfac", "kronfluence"),
        Method("trak (1 ckpt)", "trak", {"proj_dim": 2048}),
        Method("tracin (captum)", "tracin"),
        Method("ensemble 1", "ours", {}, models=NETWORKS, ensemble=1),  # convex: every seed, one optimum
        Method("cg", "ours", {"ihvp": "cg"}),
        Method("lissa", "ours", {"ihvp": "lissa"}),
        Method("ensemble 5", "ours", {}, models=NETWORKS, ensemble=5),
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


# ---------------------------------------------------------------- the base run and the halves
@dataclass
class Case:
    """One model's base run, its θ̂ as a state_dict (networks), the test ids and the halves."""
    model: str
    folder: Path
    base: Any  # engine Run
    weights: Path | None
    test_ids: np.ndarray  # (T,)
    retrained: Any  # engine.lds.Retrained
    settings: dict[str, Any]


def base_options(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The build options every run of ``model`` shares (λ, δ, the data subset, the training recipe)."""
    from engine.config import TrainConfig

    lam, delta = OBJECTIVE[model]
    train = TrainConfig(epochs=args.epochs, polish_s=args.polish_s, channels=qm.FMNIST_CHANNELS, width=RESNET_WIDTH)
    return {"weight_decay": lam if args.weight_decay is None else args.weight_decay,
            "damping": delta if args.damping is None else args.damping, "train_size": args.train_size,
            "test_size": args.test_size, "seed": args.seed, "device": "cpu",
            "train": train if model in NETWORKS else TrainConfig()}


def prepare(args: argparse.Namespace, model: str) -> Case:
    import engine
    from engine import lds

    opts = base_options(args, model)
    settings = {"model": model, "n_train": args.train_size, "n_test": args.test_size, "seed": args.seed,
                "weight_decay": opts["weight_decay"], "damping": opts["damping"]}
    if model in NETWORKS:
        settings.update(epochs=args.epochs, polish_s=args.polish_s)
    folder = args.work / "-".join(f"{k}{v}" for k, v in settings.items())
    base_path = folder / "base"
    t = time.perf_counter()
    if (base_path / "run.json").is_file():
        base = engine.open_run(base_path, device="cpu")
    else:
        cheap = {"ihvp": "exact"} if model == "logreg" else {"ihvp": "fisher", "project": 64,
                                                            "projection": "kronecker"}  # θ̂ is what counts
        base = engine.build(data=DATA, model=model, out=base_path, force=True, progress=True, **cheap, **opts)
    print(f"{model}: base run {base_path} ({time.perf_counter() - t:.0f} s; training "
          f"{base.info.timings.get('train_s', 0):.0f} s)", flush=True)
    weights = None
    if model in NETWORKS:
        weights = folder / "weights.pt"
        obj = base.model.objective
        obj.load_flat(base.model.theta)
        torch.save({k: v.detach().clone() for k, v in obj.model.state_dict().items()}, weights)
    test_ids = np.sort(np.random.default_rng(args.seed).choice(base.n_test, size=args.tests, replace=False))
    np.save(folder / f"test_ids-{args.tests}.npy", test_ids)
    settings.update(subsets=args.subsets, fraction=args.fraction, tests=args.tests, n_params=base.model.n_params,
                    train_s=base.info.timings.get("train_s"), training=base.info.training)
    retrained = None
    if not args.scores_only:
        reuse_prefix(base, subsets=args.subsets, fraction=args.fraction, seed=args.seed)
        retrained = lds.retrain_outputs(base, subsets=args.subsets, fraction=args.fraction, seed=args.seed,
                                        retraining="scratch", progress=True)
        settings.update(retrain_s=retrained.seconds, ground_truth=retrained.ground_truth)
    return Case(model, folder, base, weights, test_ids, retrained, settings)


def reuse_prefix(base: Any, *, subsets: int, fraction: float, seed: int) -> None:
    """Seed the cache of M halves from a larger cache whose first M halves are done: the masks of
    ``subset_masks(n, subsets=M, seed=s)`` are the first M of any larger M' (one generator, drawn in
    order) and half m always starts from init seed s + m, so its first M rows are the same models."""
    from engine import lds

    target = lds.cache_path(base, subsets=subsets, fraction=fraction, seed=seed, retraining="scratch")
    if target.is_file():
        return
    masks = lds.subset_masks(base.n_train, subsets=subsets, fraction=fraction, seed=seed)  # (M, n)
    for src in sorted(target.parent.glob(target.name.replace(f"-m{subsets}-", "-m*-"))):
        with np.load(src) as f:
            state = {k: f[k] for k in f.files}
        if len(state["done"]) > subsets and state["done"][:subsets].all() \
                and np.array_equal(state["masks"][:subsets], masks):
            tmp = target.with_suffix(".tmp.npz")
            np.savez(tmp, **{k: v[:subsets] for k, v in state.items()})
            tmp.replace(target)
            print(f"{base.path}: the first {subsets} halves taken from {src.name}", flush=True)
            return


# ---------------------------------------------------------------- one method, in a subprocess
def worker(request: dict[str, Any]) -> None:
    """Build one of our methods' runs from the request, score the test ids, write the npz."""
    import engine

    torch.set_num_threads(int(request["threads"]))
    options = dict(request["options"])
    if "train" in options:
        from engine.config import TrainConfig

        options["train"] = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in options["train"].items()})
    ihvp = options.get("ihvp")
    out = Path(request["folder"])
    test_ids = np.load(request["test_ids"])
    t = time.perf_counter()
    run = engine.build(data=DATA, model=request["model"], out=out, force=True, progress=False, **options)
    built = time.perf_counter() - t
    scores = np.asarray(run.scores(test_ids, ihvp=ihvp), dtype=np.float64)  # (n_train, T)
    total = time.perf_counter() - t
    given = float(run.info.timings.get("train_s", 0.0)) if request["theta_given"] else 0.0
    np.savez(request["out"], raw=scores, seconds=total - given, build_s=built, scores_s=total - built,
             train_s=float(run.info.timings.get("train_s", 0.0)), version="ours", torch=torch.__version__,
             load=qm.load_average()[0])  # the machine's 1-minute load average as it finished
    shutil.rmtree(out, ignore_errors=True)


def request_for(args: argparse.Namespace, case: Case, m: Method, out: Path) -> tuple[list[str], dict[str, Any]]:
    """The command line and request of one method's subprocess."""
    request: dict[str, Any] = {"threads": args.threads, "test_ids": str(case.folder / f"test_ids-{args.tests}.npy"),
                               "out": str(out)}
    if m.library != "ours":
        request.update(peer=m.library, settings=m.options, run=str(case.base.path))
        return [str(PEER_PYTHON), str(ROOT / "bench" / "quality_peers.py")], request
    options = {**base_options(args, case.model), **m.options}
    options["train"] = asdict(options["train"])
    builtin = m.ensemble > 0 or case.model not in NETWORKS
    if m.ensemble > 0:
        options.update(ensemble=m.ensemble, ihvp="exact" if case.model == "logreg" else "ekfac")
    elif case.model in NETWORKS:
        options.update(weights=str(case.weights), dtype=str(case.base.model.dtype).removeprefix("torch."))
    request.update(model=case.model if builtin else FACTORY[case.model], options=options,
                   folder=str(case.folder / f"method-{slug(m.name)}"),
                   theta_given=m.ensemble == 0 and case.model not in NETWORKS)
    return [sys.executable, str(Path(__file__).resolve()), "--worker"], request


def run_method(args: argparse.Namespace, case: Case, m: Method) -> dict[str, Any]:
    """The method's scores (cached) converted to ours, its seconds, and its LDS (loss and margin)."""
    from engine import lds

    out = case.folder / "results" / f"{slug(m.name)}-t{args.tests}.npz"
    err = out.with_suffix(".error.txt")
    if m.name in args.redo or "all" in args.redo:
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
    if err.is_file():
        return {"library": m.library, "error": err.read_text().strip()}
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd, request = request_for(args, case, m, out)
        req_path = out.with_suffix(".request.json")
        req_path.write_text(json.dumps(request, indent=2))
        print(f"{case.model}: {m.name} ...", flush=True)
        try:
            proc = subprocess.run([*cmd, str(req_path)], capture_output=True, text=True, timeout=args.method_timeout,
                                  cwd=ROOT, check=False)
            if proc.returncode != 0 or not out.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                err.write_text(f"exit {proc.returncode}: {' | '.join(tail)}"[:600])
        except subprocess.TimeoutExpired:
            err.write_text(f"timeout: not finished in {args.method_timeout:g} s")
        if err.is_file():
            print(f"{case.model}: {m.name} failed: {err.read_text()}", flush=True)
            return {"library": m.library, "error": err.read_text().strip()}
    with np.load(out) as f:
        raw, seconds, version = f["raw"], float(f["seconds"]), str(f["version"])
        extra = {k: float(f[k]) for k in ("build_s", "scores_s", "train_s", "load") if k in f.files}
    conv = PEERS.get(m.library, Convention(1.0, False, "train_test", "ours"))
    scores = conv.sign * (raw.T if conv.layout == "test_train" else raw)  # (n_train, T): our sign and layout
    res: dict[str, Any] = {"library": m.library, "version": version, "seconds": seconds, **extra,
                           "options": m.options, "ensemble": m.ensemble or None}
    res["convention"] = conv.note
    if case.retrained is None:  # --scores-only
        print(f"{case.model}: {m.name}: {seconds:.1f} s", flush=True)
        return res
    for output in ("loss", "margin"):
        found = (case.retrained.losses if output == "loss" else case.retrained.margins)[:, case.test_ids]  # (M, T)
        r = lds.lds_score(scores, case.retrained.masks, found, output=output, seed=args.seed)
        res[output] = {"lds": r["lds"], "ci95": r["ci95"], "n_valid": r["n_valid"]}
    print(f"{case.model}: {m.name}: LDS {res['loss']['lds']:.3f} {res['loss']['ci95']}, {seconds:.1f} s", flush=True)
    return res


# ---------------------------------------------------------------- summary and table
def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's target: our best LDS (loss) at no more wall time ≥ the best peer's LDS."""
    ok = {k: v for k, v in rows.items() if "loss" in v and np.isfinite(v["loss"]["lds"])}
    peers = {k: v for k, v in ok.items() if v["library"] != "ours"}
    if not peers:
        return None
    best_peer = max(peers, key=lambda k: peers[k]["loss"]["lds"])
    limit = peers[best_peer]["seconds"]
    ours = {k: v for k, v in ok.items() if v["library"] == "ours" and v["seconds"] <= limit}
    best_ours = max(ours, key=lambda k: ours[k]["loss"]["lds"]) if ours else None
    top = ours.get(best_ours, {"loss": {"lds": None}, "seconds": None})
    return {"best_peer": best_peer, "best_peer_lds": peers[best_peer]["loss"]["lds"], "best_peer_s": limit,
            "best_ours_within_time": best_ours, "best_ours_lds": top["loss"]["lds"], "best_ours_s": top["seconds"],
            "met": best_ours is not None and top["loss"]["lds"] >= peers[best_peer]["loss"]["lds"]}


def table(report: dict[str, Any]) -> str:
    lines = []
    for model, c in report["cases"].items():
        s = c["settings"]
        lines += ["", (f"{model}: Fashion-MNIST {s['n_train']} train / {s['n_test']} test, {s['n_params']} params, "
                       f"λ={s['weight_decay']:g} δ={s['damping']:g}; M={s['subsets']} halves (retrained from scratch, "
                       f"{s.get('retrain_s', 0):.0f} s), T={s['tests']} test points; θ̂ trained in {s['train_s'] or 0:.0f} s"),
                  f"{'method':<24} {'LDS':>7} {'95% CI':>16} {'wall s':>8}  notes"]
        for name, r in c["methods"].items():
            if "loss" not in r:
                lines.append(f"{name:<24} {'-':>7} {'':>16} {'-':>8}  {r.get('error', 'no LDS')[:110]}")
                continue
            lo, hi = r["loss"]["ci95"]
            note = ("" if r["library"] == "ours" else r["library"]) + (f" (load {r['load']:.0f})" if "load" in r else "")
            if r.get("ensemble"):
                note += f" includes training {r['ensemble']} model(s)"
            lines.append(f"{name:<24} {r['loss']['lds']:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>16} {r['seconds']:>8.1f}  {note}")
        v = c.get("verdict")
        if v:
            lines.append(f"target (best peer {v['best_peer']}: LDS {v['best_peer_lds']:.3f} in {v['best_peer_s']:.1f} s): "
                         f"ours within that time: {v['best_ours_within_time']} "
                         f"{'-' if v['best_ours_lds'] is None else format(v['best_ours_lds'], '.3f')} -> "
                         f"{'MET' if v['met'] else 'NOT MET'}")
    m = report["machine"]
    lines.append(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch threads {report['threads']}; load average "
                 f"{report['load_start'][0]:.1f} at start, {report['load_end'][0]:.1f} at end; wall s = data → scores "
                 "with θ̂ given (ours: build + scores; peers: fit + scores in their venv); LDS of the test loss "
                 "(= softplus(−margin), so the margin's LDS, in the JSON, ranks the same)")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="logreg,cnn", help="comma-separated: logreg, cnn, resnet")
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: all that apply)")
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--subsets", type=int, default=20, help="M: retrained halves")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--tests", type=int, default=100, help="T: test points scored")
    ap.add_argument("--project", default="512,2048", help="K of the projected methods (comma-separated: several)")
    ap.add_argument("--weight-decay", type=float, default=None, help="λ (default per model: logreg 1e-2, networks 1e-3)")
    ap.add_argument("--damping", type=float, default=None, help="δ (default per model: logreg 0, networks 1e-3)")
    ap.add_argument("--epochs", type=int, default=20, help="networks: Adam epochs (θ̂ and every half)")
    ap.add_argument("--polish-s", type=float, default=10.0, help="networks: L-BFGS polish seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every method's process")
    ap.add_argument("--method-timeout", type=float, default=900.0, help="seconds per method")
    ap.add_argument("--redo", default="", help="comma-separated method names to recompute ('all')")
    ap.add_argument("--scores-only", action="store_true",
                    help="compute and cache the methods' scores only (no retraining, no LDS): beside a run that retrains")
    ap.add_argument("--quick", action="store_true", help="smoke: logreg on 1,000/200, M=8, T=20")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.train_size, args.test_size, args.subsets, args.tests = "logreg", 1000, 200, 8, 20
    args.redo = [r for r in args.redo.split(",") if r]
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(Path(sys.argv[2]).read_text()))
        return
    args = parse()
    torch.set_num_threads(args.threads)
    wanted = None if args.methods is None else set(args.methods.split(","))
    load = qm.load_average()
    report: dict[str, Any] = {"threads": args.threads, "load_start": load, "load_end": load, "machine": machine_info(),
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "cases": {}}
    for model in args.models.split(","):
        case = prepare(args, model)
        rows: dict[str, dict[str, Any]] = {}
        report["cases"][model] = {"settings": case.settings, "methods": rows}
        for m in methods([int(k) for k in args.project.split(",")]):
            if model not in m.models or (wanted is not None and m.name not in wanted):
                continue
            if m.library != "ours" and not PEER_PYTHON.is_file():
                rows[m.name] = {"library": m.library, "error": f"no peers' venv {PEER_PYTHON}"}
            else:
                rows[m.name] = run_method(args, case, m)
            report["cases"][model]["verdict"] = verdict(rows)
            report["load_end"] = qm.load_average()
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))  # partial results survive a stop
    print(table(report))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
