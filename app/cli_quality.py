"""The ``influence`` reliability commands: ``lds``, ``mislabels`` and ``brittleness``.

Each retrains models (:mod:`engine.lds`, :mod:`engine.mislabel`, :mod:`engine.brittle`), shows
progress bars on stderr unless ``--quiet``, saves its result in the run folder (the dashboard's
reliability panel reads it) and prints a summary, or the result as JSON with ``--json``. Bad input
raises an :class:`engine.InfluenceError`: :func:`app.cli.main` prints it on one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.limits import DEFAULT_LDS_TESTS
from engine.errors import QueryError

__all__ = ["COMMANDS", "add_quality_commands", "run_quality"]

COMMANDS = ("lds", "mislabels", "brittleness")
RECALL_AT = ("1", "5", "10", "20")


def _common(p: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--ihvp", choices=methods, default=None, help="IHVP method (default: the run's own)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_quality_commands(sub: Any, methods: Sequence[str]) -> None:
    """Add the three commands to ``sub`` (the ``influence`` parser's subparsers)."""
    ld = sub.add_parser("lds", help="linear datamodeling score: retrain on random subsets and correlate "
                        "summed influence with the retrained outputs; saved as lds.json in the run")
    _common(ld, methods)
    ld.add_argument("--subsets", type=int, default=30, help="random subsets M, one retrained model each (30)")
    ld.add_argument("--fraction", type=float, default=0.5, help="share of the training set per subset (0.5)")
    ld.add_argument("--tests", type=int, default=None,
                    help=f"test points drawn with --seed ({DEFAULT_LDS_TESTS}, or all when fewer)")
    ld.add_argument("--test-index", type=int, nargs="+", default=None, help="these test points instead")
    ld.add_argument("--output", choices=("loss", "margin"), default="loss",
                    help="the retrained model's output to correlate with (loss)")
    ld.add_argument("--damping", type=float, default=None, help="damping δ of the scores (the run's)")
    ld.add_argument("--retraining", choices=("scratch", "warm"), default="scratch",
                    help="networks: from a fresh seeded init (scratch) or warm-started from θ̂")
    ld.add_argument("--seed", type=int, default=0, help="subsets, test draw and init seeds (0)")
    ld.add_argument("--quiet", action="store_true", help="no progress bars")

    ml = sub.add_parser("mislabels", help="AUC and recall@k%% of self-influence, training loss and "
                        "gradient norm against the labels flipped by build --label-noise")
    _common(ml, methods)

    br = sub.add_parser("brittleness", help="the fewest top helpful training points whose removal "
                        "(and retraining) flips a test prediction; saved as brittleness.json")
    _common(br, methods)
    br.add_argument("--test-index", type=int, nargs="+", default=None,
                    help="test points (default: --tests drawn with --seed)")
    br.add_argument("--tests", type=int, default=5, help="test points to draw (5)")
    br.add_argument("--max-k", type=int, default=None, help="largest k to try (the engine's default)")
    br.add_argument("--seed", type=int, default=0)
    br.add_argument("--quiet", action="store_true", help="no progress bars")


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def format_lds(r: dict[str, Any]) -> str:
    """'LDS 0.93 (95% CI 0.91–0.95), 30 subsets of 50%, …' and the ground truth, two lines."""
    lo, hi = r["ci95"]
    n = len(r["test_ids"])
    valid = r.get("n_valid", n)
    tests = f"{n} test points" + ("" if valid == n else f" ({valid} with a defined correlation)")
    head = (f"LDS {_num(r['lds'])} (95% CI {_num(lo)}–{_num(hi)}), {r['subsets']} subsets of "
            f"{100 * r['fraction']:g}%, {tests}, output {r['output']}, ihvp {r['ihvp']} "
            f"(δ={r['damping']:g}), retraining {r['retraining']}; {r['seconds']:.1f} s "
            f"(retraining {r['retrain_seconds']:.1f} s)")
    return f"{head}\n  ground truth: {r['ground_truth']}"


def format_mislabels(r: dict[str, Any]) -> str:
    """A table: one row per score with its AUC and recall in the top 1, 5, 10, 20%."""
    lines = [(f"mislabel check: {r['n_flipped']} of {r['n_train']} training labels flipped "
             f"(label noise {r['label_noise']:g}), ihvp {r['ihvp']}"),
             f"  {'score':<15} {'AUC':>6} " + " ".join(f"{'top ' + p + '%':>8}" for p in RECALL_AT)]
    for s in r["scores"]:
        recall = s["recall"]
        lines.append(f"  {s['score']:<15} {s['auc']:>6.3f} "
                     + " ".join(f"{_num(recall.get(p), '.1%'):>8}" for p in RECALL_AT))
    return "\n".join(lines)


def format_brittleness(r: dict[str, Any]) -> str:
    """The median k, then one line per test point: flipped by removing k points, or not."""
    from app.services import brittleness_summary

    s = brittleness_summary(r["results"])
    median = (f"more than {s['max_k']}" if s["above_max_k"] else _num(s["median_k"], "g"))
    lines = [(f"brittleness, ihvp {r['ihvp']}: median k {median}; {s['flipped']} of {s['n_tests']} "
             f"predictions flipped by removing their top helpful training points ({r['seconds']:.1f} s)")]
    for t in r["results"]:
        to = next((step["predicted"] for step in t["tried"] if step["flipped"]), None)
        found = (f"flipped to {to} by removing k = {t['k']}" if t["k"] is not None
                 else f"not flipped by removing up to {t['max_k']}")
        lines.append(f"  test {t['test_id']:>6}  label {t['label']:>3}  predicted {t['predicted']:>3}  {found}")
    return "\n".join(lines)


def _lds(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    from engine.lds import lds

    tests = args.tests if args.tests is not None else min(DEFAULT_LDS_TESTS, run.n_test)
    return lds(run, subsets=args.subsets, fraction=args.fraction, tests=tests, test_index=args.test_index,
               output=args.output, ihvp=args.ihvp, damping=args.damping, retraining=args.retraining,
               seed=args.seed, save=True, progress=not args.quiet)


def _mislabels(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    from engine.mislabel import mislabel_check

    if run.info.data.n_flipped == 0:
        raise QueryError(f"run {run.path} has no recorded label flips to find: build it with "
                         "--label-noise F (e.g. 0.1) to measure mislabel detection")
    return mislabel_check(run, ihvp=args.ihvp, save=True)


def _brittleness(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    from engine.brittle import brittleness

    return brittleness(run, test_index=args.test_index, tests=args.tests, max_k=args.max_k,
                       ihvp=args.ihvp, seed=args.seed, save=True, progress=not args.quiet)


_RUN: dict[str, tuple[Callable[[Any, argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], str]]]
_RUN = {"lds": (_lds, format_lds), "mislabels": (_mislabels, format_mislabels),
        "brittleness": (_brittleness, format_brittleness)}


def run_quality(args: argparse.Namespace) -> None:
    """Run one of :data:`COMMANDS` on ``args.run`` and print its summary (or JSON)."""
    import engine

    compute, show = _RUN[args.command]
    result = compute(engine.open_run(args.run), args)
    print(json.dumps(result, indent=2) if args.json else show(result))
