"""``influence demo`` (and ``make demo``): build the demo run when it is missing or stale, then serve it.

The demo shows real photographs when it can: with Debian's ``dataset-fashion-mnist`` installed
(the files under :data:`engine.data.idx.FASHION_MNIST_DIR`) it builds the built-in ``cnn`` on a
seeded, stratified Fashion-MNIST subset (:data:`FASHION_TRAIN_SIZE` training and
:data:`FASHION_TEST_SIZE` test images, EK-FAC curvature; built in 26-34 s on two busy cores). Without the
package it prints :data:`FALLBACK_HINT` (one line) and builds the 8×8 digits with logistic
regression, as before.

The run folder (``INFLUENCE_DEMO_RUN``) is reused while its recorded settings are the ones the demo
asks for now; a run from another data set, an older version of the demo or engine, or one that no
longer opens is rebuilt, with a one-line reason on stderr. A folder there that is not a run is
never replaced.

``python -m app.demo OUT`` builds (or refreshes) the demo run at ``OUT`` without serving it (the
Docker image's first start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import engine
from engine.build import ENGINE_VERSION
from engine.data import idx
from engine.models.threads import intra_op_threads
from engine.runinfo import RUN_FILE

__all__ = ["DEFAULT_FASHION_TRAIN", "DEMO_THREADS", "FALLBACK_HINT", "FASHION_TEST_SIZE", "FASHION_TRAIN_SIZE",
           "DemoSpec", "choose_spec", "demo", "fashion_mnist_installed", "main", "prepare_demo",
           "stale_reason"]

FASHION_TRAIN_SIZE = 2000  # training images of the Fashion-MNIST demo (a seeded, stratified subset)
FASHION_TEST_SIZE = 500  # test images shown on the pages
# The demo's network training: 15 Adam epochs and a short L-BFGS polish keep a fresh build near a
# half-minute on two cores (test accuracy 0.80-0.82 on the 500 test images; the engine's defaults
# train longer for a θ̂ nearer stationarity).
DEFAULT_FASHION_TRAIN: Mapping[str, Any] = {"epochs": 15, "polish_s": 10.0}
# PyTorch CPU threads while the demo builds. Its cnn is small, so one thread loses little on an
# idle machine, and on a busy one a parallel operator waits for its slowest thread: on 2 cores
# under load 11-13, the same Fashion-MNIST build took 31 s with one thread and 88 s with two
# (gradients 1.0 s vs 19.2 s, EK-FAC 3.4 s vs 37.8 s; the same test accuracy).
DEMO_THREADS = 1
FALLBACK_HINT = (f"Fashion-MNIST is not installed (sudo apt-get install {idx.FASHION_MNIST_PACKAGE}); "
                 "serving the 8×8 digits demo instead")
# Settings that do not change a run's numbers: a run built with others is still the demo's.
IGNORED_SETTINGS = ("device", "chunk_size")


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """What the demo builds: ``engine.build(data, model, out, **options)``."""

    title: str  # for messages, e.g. "Fashion-MNIST (2,000 training / 500 test images), cnn, EK-FAC"
    data: str
    model: str
    options: Mapping[str, Any]

    def config(self) -> engine.BuildConfig:
        """The :class:`~engine.BuildConfig` a build of this spec records."""
        return engine.BuildConfig(data=self.data, model=self.model, **self.options)


def fashion_mnist_installed() -> bool:
    """Whether the four Fashion-MNIST IDX files (gzipped or not) are in ``FASHION_MNIST_DIR``
    (read at call time, so tests can point it at a folder of their own)."""
    folder = Path(idx.FASHION_MNIST_DIR)
    return all((folder / stem).is_file() or (folder / f"{stem}.gz").is_file()
               for stem in idx.IDX_FILES.values())


def fashion_spec(*, train_size: int = FASHION_TRAIN_SIZE, test_size: int = FASHION_TEST_SIZE,
                 train: Mapping[str, Any] = DEFAULT_FASHION_TRAIN) -> DemoSpec:
    """The Fashion-MNIST demo: the built-in cnn with EK-FAC curvature on a seeded subset."""
    options = {"train_size": train_size, "test_size": test_size, "ihvp": engine.IHVPMethod.EKFAC,
               "train": dataclasses.replace(engine.TrainConfig(), **train)}
    return DemoSpec(f"Fashion-MNIST ({train_size:,} training / {test_size:,} test images), cnn, EK-FAC",
                    idx.FASHION_MNIST, "cnn", options)


DIGITS_SPEC = DemoSpec("8×8 digits (1,797 images), logistic regression, exact Hessian", "digits", "logreg",
                       {"ihvp": engine.IHVPMethod.EXACT})


def choose_spec(*, train_size: int = FASHION_TRAIN_SIZE, test_size: int = FASHION_TEST_SIZE,
                train: Mapping[str, Any] = DEFAULT_FASHION_TRAIN) -> tuple[DemoSpec, str | None]:
    """The demo to build here and, when Fashion-MNIST is missing, the one-line hint to print."""
    if fashion_mnist_installed():
        return fashion_spec(train_size=train_size, test_size=test_size, train=train), None
    return DIGITS_SPEC, FALLBACK_HINT


def _settings(config: engine.BuildConfig) -> dict[str, Any]:
    """A config as ``run.json`` holds it (tuples as lists), less :data:`IGNORED_SETTINGS`."""
    d = json.loads(json.dumps(config.to_dict()))
    return {k: v for k, v in d.items() if k not in IGNORED_SETTINGS}


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: found → wanted`` for each differing setting (nested configs as ``train.epochs``)."""
    out = []
    for key in sorted(found.keys() | wanted.keys()):
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key}: {a} → {b}")
    return out


def stale_reason(run: engine.Run, spec: DemoSpec) -> str | None:
    """Why ``run`` is not the demo ``spec`` asks for (None: it is, and can be served)."""
    version = run.info.raw.get("versions", {}).get("engine")
    if version != ENGINE_VERSION:
        return f"it was built by engine {version}, this is {ENGINE_VERSION}"
    diffs = _differences(_settings(run.info.config), _settings(spec.config()))
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        return f"its settings differ from the demo's ({'; '.join(diffs[:3])}{more})"
    return None


def prepare_demo(path: str | Path, *, rebuild: bool = False, train_size: int = FASHION_TRAIN_SIZE,
                 test_size: int = FASHION_TEST_SIZE, train: Mapping[str, Any] = DEFAULT_FASHION_TRAIN,
                 progress: bool = True, err: TextIO | None = None) -> engine.Run:
    """The demo run at ``path``, opened: reused when it matches the demo chosen here
    (:func:`choose_spec`), else built (a missing run), or rebuilt with a one-line reason on ``err``
    (stderr by default) when it is stale, broken or ``rebuild`` is asked for.

    Raises:
        engine.RunError: ``path`` exists and is not a run folder (it is left alone).
        engine.InfluenceError: the build fails (bad data, not enough memory).
    """
    err = err or sys.stderr
    path = Path(path)
    spec, hint = choose_spec(train_size=train_size, test_size=test_size, train=train)
    if hint:
        print(hint, file=err)
    reason = None
    if path.exists():
        if not (path / RUN_FILE).is_file():
            raise engine.RunError(f"the demo run folder {path} exists and is not a run: remove it or set "
                                  "INFLUENCE_DEMO_RUN to another folder")
        if rebuild:
            reason = "--rebuild was asked for"
        else:
            try:
                run = engine.open_run(path)
            except engine.InfluenceError as exc:  # missing files, old schema, data changed
                reason = f"it does not open ({exc})"
            else:
                reason = stale_reason(run, spec)
                if reason is None:
                    return run
        print(f"rebuilding the demo run {path}: {reason}", file=err)
    print(f"building the demo run {path}: {spec.title}", file=err)
    with intra_op_threads(DEMO_THREADS):  # the whole build, not only training
        return engine.build(spec.data, spec.model, path, force=path.exists(), progress=progress,
                            **spec.options)


def demo(host: str, port: int, *, rebuild: bool = False, path: str | Path | None = None) -> int:
    """Prepare the demo run (:func:`prepare_demo`; ``path`` defaults to ``INFLUENCE_DEMO_RUN``)
    and serve it until interrupted. Returns the exit code (0)."""
    from app.main import serve
    from app.settings import DemoSettings

    path = Path(path) if path is not None else DemoSettings().demo_run
    run = prepare_demo(path, rebuild=rebuild)
    serve(path, host=host, port=port, run=run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.demo OUT [--rebuild]``: build or refresh the demo run at OUT, don't serve."""
    p = argparse.ArgumentParser(prog="python -m app.demo", description=main.__doc__)
    p.add_argument("out", type=Path, help="the demo run folder")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when the run is current")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        run = prepare_demo(args.out, rebuild=args.rebuild, progress=not args.quiet)
    except engine.InfluenceError as exc:
        print(f"python -m app.demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"demo run ready: {run.path} ({run.info.data.n_train} training images, "
          f"test accuracy {run.info.training.get('test_accuracy', float('nan')):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
