"""The ``influence`` command: a thin layer over :mod:`engine` (and the web app for ``serve``).

Exit codes: 0 on success; 2 with a one-line message on stderr for bad input (argument errors,
bad data, stale runs, unknown indices); outputs are written atomically, so a failed command
leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from app.cli_quality import COMMANDS as QUALITY_COMMANDS
from app.cli_quality import add_quality_commands, run_quality
from engine.config import IHVPMethod
from engine.options import add_build_options, build_kwargs

PROG = "influence"
METHODS = tuple(m.value for m in IHVPMethod)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Influence functions for image classifiers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="train (or load) a model and precompute a run")
    add_build_options(b)  # defaults from engine.config.BuildConfig (engine/options.py)
    b.add_argument("--distributed", action="store_true",
                   help="one process of a torchrun job: shard the gradients and curvature "
                        "over the processes (gloo on CPUs, NCCL on GPUs)")
    b.add_argument("--json", action="store_true", help="print the run summary as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    def query(name: str, help_: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_)
        q.add_argument("--run", required=True, type=Path)
        q.add_argument("--ihvp", choices=METHODS, default=None,
                       help="override the run's IHVP method for this query")
        return q

    s = query("scores", "I_up,loss matrix (n_train, n_test_selected) to a .npy file")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--test-index", type=int, nargs="+", default=None)
    s.add_argument("--json", action="store_true", help="print the IHVP report as JSON")
    s2 = query("self", "self-influence (n_train,) to a .npy file")
    s2.add_argument("--out", required=True, type=Path)
    pr = query("params", "I_up,params of one training point to a .npy file")
    pr.add_argument("--train-index", type=int, required=True)
    pr.add_argument("--out", required=True, type=Path)
    e = query("explain", "the most helpful and harmful training points for a test point")
    e.add_argument("--test-index", type=int, required=True)
    e.add_argument("--top", type=int, default=10)
    e.add_argument("--fastif", type=int, default=None, metavar="C",
                   help="FastIF: score only the C nearest training points in the model's features")
    e.add_argument("--json", action="store_true")

    gr = query("group", "predicted change of test losses when a group of training points is removed")
    gr.add_argument("--train-index", type=int, nargs="+", default=None, help="the group's ids")
    gr.add_argument("--class", dest="label", type=int, default=None,
                    help="the group: training points of this class (with --fraction)")
    gr.add_argument("--fraction", type=float, default=1.0, help="first fraction of the class (1.0)")
    gr.add_argument("--test-index", type=int, nargs="+", default=None, help="test points (all)")
    gr.add_argument("--order", type=int, choices=(1, 2), default=1,
                    help="1: sum of influences; 2: Basu, You & Feizi (2020)")
    gr.add_argument("--check", action="store_true", help="also retrain without the group")
    gr.add_argument("--json", action="store_true")

    at = sub.add_parser("attack", help="perturb a few training images within ±epsilon so that a "
                        "test prediction flips after retraining (Koh & Liang §5.2)")
    at.add_argument("--run", required=True, type=Path)
    at.add_argument("--test-index", type=int, required=True)
    at.add_argument("--points", type=int, default=60, help="training images to perturb (60)")
    at.add_argument("--epsilon", type=float, default=0.5, help="bound on |δ| per input value (0.5)")
    at.add_argument("--iterations", type=int, default=10, help="retrainings at most (10)")
    at.add_argument("--out", type=Path, default=None,
                    help="write train_ids, original and perturbed inputs to this .npz")
    at.add_argument("--json", action="store_true")

    tr = sub.add_parser("trust", help="check predicted against actual leave-one-out retraining "
                        "per IHVP method and damping; saved as trust.json in the run")
    tr.add_argument("--run", required=True, type=Path)
    tr.add_argument("--test-index", type=int, nargs="+", default=None,
                    help="test points (default: --tests drawn with --seed)")
    tr.add_argument("--tests", type=int, default=4, help="test points to draw (4)")
    tr.add_argument("--top", type=int, default=5, help="removals per test point (5)")
    tr.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="IHVP methods (default: every one the run supports)")
    tr.add_argument("--dampings", type=float, nargs="+", default=None,
                    help="dampings δ to compare (default: the run's)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--json", action="store_true", help="print the report as JSON")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")

    add_quality_commands(sub, METHODS)  # lds, mislabels, brittleness (app/cli_quality.py)

    sv = sub.add_parser("serve", help="serve the dashboard for a run")
    sv.add_argument("--run", required=True, type=Path)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    dm = sub.add_parser("demo", help="build the demo run if missing, then serve it (a cnn on a "
                        "Fashion-MNIST subset when dataset-fashion-mnist is installed, else digits)")
    dm.add_argument("--host", default="127.0.0.1")
    dm.add_argument("--port", type=int, default=8000)
    dm.add_argument("--rebuild", action="store_true", help="rebuild the demo run even when it is current")
    return p


def _check_out(path: Path) -> None:
    """Refuse a bad --out before any work (without touching an existing file)."""
    if path.suffix != ".npy":
        raise UsageError(f"--out {path} must end in .npy")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder, not a file")
    if not path.parent.is_dir():
        raise UsageError(f"--out {path}: folder {path.parent} does not exist")


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write atomically: a temporary file next to ``path``, then rename."""
    _check_out(path)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _print_explain(result: dict[str, Any]) -> None:
    print(f"test point {result['test_id']}: label {result['label']}, "
          f"predicted {result['predicted']} (p = {max(result['probabilities']):.3f}), "
          f"ihvp {result['ihvp']['method']}")
    ens = result.get("ensemble")
    if ens:
        print(f"  averaged over {ens['members']} models (seeds {', '.join(map(str, ens['seeds']))}); "
              f"'agree a/N': the models that score it on this side and in their own top {len(result['helpful'])}")
    for kind in ("helpful", "harmful"):
        print(f"  {kind}:")
        for row in result[kind]:
            c = row.get("consistency")
            agree = f"  agree {c['agree_count']}/{c['members']}" if c else ""
            print(f"    train {row['train_id']:>7}  label {row['label']:>3}  score {row['score']:+.6g}{agree}")


def _group(run: Any, args: argparse.Namespace) -> None:
    from engine.group import group_influence
    from engine.validate import group_removal

    if (args.train_index is None) == (args.label is None):
        raise UsageError("name the group with --train-index IDS or --class C (one of them)")
    if args.train_index is not None:
        ids = args.train_index
    else:
        if not 0 <= args.label < run.dataset.n_classes or not 0 < args.fraction <= 1:
            raise UsageError(f"--class must be 0..{run.dataset.n_classes - 1} and --fraction in (0, 1]")
        members = np.flatnonzero(run.dataset.y_train == args.label)
        ids = members[: max(1, round(args.fraction * len(members)))].tolist()
    tests = args.test_index if args.test_index is not None else list(range(run.n_test))
    out = group_influence(run, ids, tests, order=args.order, ihvp=args.ihvp).to_dict()
    if args.check:
        actual = group_removal(run, ids, tests)["actual"]
        for row, a in zip(out["results"], actual):
            row["actual_loss_change"] = float(a)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    changes = np.array([r["predicted_loss_change"] for r in out["results"]])
    print(f"group of {out['group_size']} training points, order {out['order']}, ihvp {out['ihvp']}: "
          f"mean predicted test-loss change {changes.mean():+.4g} over {len(changes)} test points")
    if args.check:
        actual = np.array([r["actual_loss_change"] for r in out["results"]])
        print(f"  retrained: mean actual change {actual.mean():+.4g}, "
              f"mean |error| {np.abs(changes - actual).mean():.3g}")


def _attack(run: Any, args: argparse.Namespace) -> None:
    from engine.attack import attack

    if args.out is not None and (args.out.suffix != ".npz" or not args.out.parent.is_dir()):
        raise UsageError(f"--out {args.out} must be a .npz file in an existing folder")
    out = attack(run, args.test_index, n_points=args.points, epsilon=args.epsilon,
                 iterations=args.iterations)
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp.npz")
        np.savez(tmp, train_ids=np.array(out["train_ids"]), original=out["original"],
                 perturbed=out["perturbed"])
        os.replace(tmp, args.out)
    summary = {k: v for k, v in out.items() if k not in ("original", "perturbed")}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    verdict = "flipped" if out["flipped"] else "not flipped"
    print(f"test point {out['test_id']} (label {out['label']}): {verdict} after {out['iterations']} "
          f"retraining(s); predicted {out['predicted_before']} -> {out['predicted_after']}, "
          f"p(label) {out['proba_before'][out['label']]:.3f} -> {out['proba_after'][out['label']]:.3f}; "
          f"{len(out['train_ids'])} training images changed by at most {out['max_abs_delta']:.3g}")


def _print_trust(report: dict[str, Any]) -> None:
    print(f"trust check of {report['model']}: {len(report['pairs'])} removals on test points "
          f"{report['test_ids']}; ground truth: {report['ground_truth']}")
    print(f"  mean |actual loss change| {report['mean_abs_actual']:.3g}, "
          f"noise floor (retrained, nothing removed) {report['noise_floor']:.3g}")
    for row in report["results"]:
        if "error" in row:
            print(f"  {row['method']:>9}  δ={row['damping']:<8g} error: {row['error']}")
        else:
            print(f"  {row['method']:>9}  δ={row['damping']:<8g} Pearson {row['pearson']:+.4f}  "
                  f"Spearman {row['spearman']:+.4f}  ({row['seconds']:.2f} s)")


def _summary(run: Any) -> dict[str, Any]:
    info = run.info
    return {"run": str(run.path), "model": info.model.kind.value, "n_params": info.model.n_params,
            "n_train": info.data.n_train, "n_test": info.data.n_test,
            "grad_norm": info.training["grad_norm"],
            "train_accuracy": info.training["train_accuracy"],
            "test_accuracy": info.training["test_accuracy"],
            "ihvp": info.config.ihvp.value, "timings": info.timings}


def _serve(run_path: Path, host: str, port: int, run: Any) -> None:
    try:
        from app.main import serve
    except ImportError as exc:
        raise UsageError(f"the web dashboard is not available: {exc}") from exc
    serve(run_path, host=host, port=port, run=run)


def _dispatch(args: argparse.Namespace) -> None:
    import engine

    if args.command == "build":
        build: Any = engine.build
        if args.distributed:
            from engine.distributed import build_distributed as build
        run = build(args.data, args.model, args.out, progress=not args.quiet, **build_kwargs(args))
        if run is None:  # a torchrun process other than rank 0: rank 0 reports
            return
        summary = _summary(run)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"built {summary['run']}: {summary['model']} ({summary['n_params']} parameters), "
                  f"test accuracy {summary['test_accuracy']:.3f}, |grad R| {summary['grad_norm']:.2e}, "
                  f"{summary['timings']['total_s']:.1f} s")
        return
    if args.command == "demo":
        from app.demo import prepare_demo
        from app.settings import DemoSettings

        demo_run = DemoSettings().demo_run  # INFLUENCE_DEMO_RUN
        _serve(demo_run, args.host, args.port, prepare_demo(demo_run, rebuild=args.rebuild))
        return
    if args.command == "serve":
        # opened here, once: a bad run is refused with a one-line error before the server starts
        _serve(args.run, args.host, args.port, engine.open_run(args.run))
        return
    if args.command == "attack":
        _attack(engine.open_run(args.run), args)
        return
    if args.command in QUALITY_COMMANDS:
        run_quality(args)
        return
    if args.command == "trust":
        from engine.trust import trust_check

        report = trust_check(engine.open_run(args.run), test_index=args.test_index, n_tests=args.tests,
                             top=args.top, methods=args.methods, dampings=args.dampings,
                             seed=args.seed, progress=not args.quiet)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_trust(report)
        return
    if getattr(args, "out", None) is not None:
        _check_out(args.out)
    run = engine.open_run(args.run)
    if args.command == "scores":
        _save_npy(args.out, run.scores(test_index=args.test_index, ihvp=args.ihvp))
        if args.json:
            print(json.dumps(run.ihvp_report(args.ihvp), indent=2))
    elif args.command == "self":
        _save_npy(args.out, run.self_influence(ihvp=args.ihvp))
    elif args.command == "params":
        _save_npy(args.out, run.params(args.train_index, ihvp=args.ihvp))
    elif args.command == "group":
        _group(run, args)
    elif args.command == "explain":
        if args.fastif is not None:
            from engine.query.knn import fastif_top_influences

            found = fastif_top_influences(run, [args.test_index], top=args.top,
                                          candidates=args.fastif, ihvp=args.ihvp)[0]
            result = {**run.explain(args.test_index, top=1, ihvp=args.ihvp),
                      "helpful": found["helpful"], "harmful": found["harmful"],
                      "fastif": {"candidates": args.fastif, "scored": found["candidates"]}}
        else:
            result = run.explain(args.test_index, top=args.top, ihvp=args.ihvp)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_explain(result)


def main(argv: Sequence[str] | None = None) -> int:
    from engine.errors import InfluenceError

    try:
        _dispatch(_parser().parse_args(argv))
    except (UsageError, InfluenceError) as exc:
        msg = " ".join(str(exc).split())  # one line
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `influence explain --json | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # as a shell reports a process ended by SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
