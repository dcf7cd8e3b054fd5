"""What the dashboard shows, computed once for the REST API and the pages alike.

:class:`Dashboard` wraps an opened :class:`engine.Run` and returns plain JSON-ready dicts; the
routes in ``app/routes/`` only parse parameters and call it, so a page and the API can never
disagree on a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine import IndexOutOfRange, InfluenceError, QueryError, Run
from engine.brittle import load_brittleness
from engine.group import group_influence
from engine.lds import load_lds
from engine.mislabel import load_mislabel
from engine.trust import load_trust
from engine.validate import group_removal

from .images import decode_upload, png_data_url
from .limits import DEFAULT_CLUSTERS, DEFAULT_LIMIT, DEFAULT_TOP, MAX_CLUSTERS, MAX_LIMIT, MAX_TOP

__all__ = ["DEFAULT_LIMIT", "DEFAULT_TOP", "MAX_LIMIT", "MAX_TOP", "Dashboard", "brittleness_summary",
           "check_index"]

RANKINGS = ("self_influence", "loss", "grad_norm")


def check_index(index: int, n: int, what: str) -> int:
    if not 0 <= index < n:
        raise IndexOutOfRange(f"{what} index {index} is out of range 0..{n - 1}")
    return index


def brittleness_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median k of a brittleness search over its test points, a point not flipped within
    its ``max_k`` counting as larger than any k (so the median may be "more than max_k")."""
    ks = sorted((r["k"] if r["k"] is not None else np.inf) for r in results)
    if not ks:
        return {"median_k": None, "above_max_k": False, "flipped": 0, "n_tests": 0}
    mid = len(ks) // 2
    median = ks[mid] if len(ks) % 2 else (ks[mid - 1] + ks[mid]) / 2
    flipped = sum(r["k"] is not None for r in results)
    return {"median_k": float(median) if np.isfinite(median) else None,
            "above_max_k": not np.isfinite(median), "flipped": flipped, "n_tests": len(ks),
            "max_k": max(r["max_k"] for r in results)}


def _check_top(top: int) -> int:
    if not 1 <= top <= MAX_TOP:
        raise QueryError(f"top must be between 1 and {MAX_TOP}, got {top}")
    return top


def _page(total: int, offset: int, limit: int) -> slice:
    if offset < 0:
        raise QueryError(f"offset must be at least 0, got {offset}")
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return slice(offset, min(offset + limit, total))


class Dashboard:
    """The served run and every view of it (dicts shaped like the REST responses)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        x = run.dataset.x_train
        lo, hi = float(x.min()), float(x.max())
        # uploads' 0..255 map onto [0, 1] when the data lie in it (as served PNGs do), else onto
        # the training range, mirroring how :func:`app.images.png_bytes` encodes inputs
        self.value_range = (0.0, 1.0) if 0.0 <= lo and hi <= 1.0 else (lo, hi)

    # ------------------------------------------------------------------ run
    @property
    def class_names(self) -> list[str]:
        return list(self.run.dataset.class_names)

    @property
    def methods(self) -> list[str]:
        """IHVP methods a query may ask for on this run."""
        return [m.value for m in self.run.solvers.available()]

    def _test_predicted(self) -> np.ndarray:
        return self.run.predictions("test").argmax(axis=1)

    def health(self) -> dict[str, Any]:
        run = self.run
        return {"status": "ok", "n_train": run.n_train, "n_test": run.n_test,
                "n_classes": run.dataset.n_classes, "model": run.info.model.kind.value,
                "ihvp": run.default_method.value, "methods": self.methods,
                "test_accuracy": run.info.training.get("test_accuracy")}

    def summary(self, ihvp: str | None = None) -> dict[str, Any]:
        """The run at a glance: data, model, training, accuracy, confusion matrix, IHVP report."""
        run = self.run
        y, pred = run.dataset.y_test, self._test_predicted()
        c = run.dataset.n_classes
        confusion = np.zeros((c, c), dtype=np.int64)  # rows: true class, columns: predicted
        np.add.at(confusion, (y, pred), 1)
        return {
            **self.health(),
            "data": run.dataset.source,
            "class_names": self.class_names,
            "input_shape": list(run.dataset.input_shape),
            "n_params": run.info.model.n_params,
            "tracked": {"patterns": run.config.params, "n_params": run.info.model.n_params,
                        "n_params_all": run.info.raw["model"].get("n_params_all", run.info.model.n_params)},
            "store": {"kind": run.store.space.kind, "k": run.store.space.dim if run.store.projected else None,
                      "dtype": run.store.manifest.get("dtype")},
            "weight_decay": run.config.weight_decay,
            "damping": run.config.damping,
            "training": run.info.training,
            "accuracy": float((y == pred).mean()),
            "confusion": confusion.tolist(),
            "ihvp_report": run.ihvp_report(ihvp),
            "ensemble": run.info.raw.get("ensemble"),
        }

    # ------------------------------------------------------------------ test points
    def test_points(self, *, offset: int = 0, limit: int = DEFAULT_LIMIT, label: int | None = None,
                    predicted: int | None = None, misclassified: bool | None = None,
                    min_confidence: float | None = None, max_confidence: float | None = None
                    ) -> dict[str, Any]:
        """Test points matching every given filter, in id order, one page of them."""
        run = self.run
        proba = run.predictions("test")
        pred, conf, y = proba.argmax(axis=1), proba.max(axis=1), run.dataset.y_test
        keep = np.ones(run.n_test, dtype=bool)
        for name, value in (("label", label), ("predicted", predicted)):
            if value is not None and not 0 <= value < run.dataset.n_classes:
                raise QueryError(f"{name} {value} is out of range 0..{run.dataset.n_classes - 1}")
        if label is not None:
            keep &= y == label
        if predicted is not None:
            keep &= pred == predicted
        if misclassified is not None:
            keep &= (pred != y) == misclassified
        if min_confidence is not None:
            keep &= conf >= min_confidence
        if max_confidence is not None:
            keep &= conf <= max_confidence
        ids = np.flatnonzero(keep)
        page = ids[_page(len(ids), offset, limit)]
        return {"total": len(ids), "offset": offset, "limit": limit,
                "items": [{"test_id": int(i), "label": int(y[i]), "predicted": int(pred[i]),
                           "confidence": float(conf[i])} for i in page]}

    def test_point(self, test_id: int) -> dict[str, Any]:
        i = check_index(test_id, self.run.n_test, "test")
        proba = self.run.predictions("test")[i]
        return {"test_id": i, "label": int(self.run.dataset.y_test[i]), "predicted": int(proba.argmax()),
                "probabilities": proba.tolist()}

    def test_point_influence(self, test_id: int, *, top: int = DEFAULT_TOP, ihvp: str | None = None,
                             fastif: int | None = None, pool: int = 0) -> dict[str, Any]:
        """Top-k helpful and harmful training points of one test point (the contract's shape).
        ``fastif``: score only that many kNN candidates in the model's feature space (FastIF,
        ``engine.query.knn``; plus the ``pool`` largest-gradient points), a recall trade-off."""
        check_index(test_id, self.run.n_test, "test")
        if fastif is None:
            return self.run.explain(test_id, top=_check_top(top), ihvp=ihvp)
        from engine.query.knn import fastif_top_influences

        found = fastif_top_influences(self.run, [test_id], top=_check_top(top), candidates=fastif,
                                      pool=pool, ihvp=ihvp)[0]
        return {**self.test_point(test_id), "helpful": found["helpful"], "harmful": found["harmful"],
                "ihvp": self.run.ihvp_report(ihvp),
                "fastif": {"candidates": fastif, "pool": pool, "scored": found["candidates"],
                           "space": "features"}}

    def test_point_scores(self, test_id: int, *, ihvp: str | None = None) -> dict[str, Any]:
        """Every training point's ``I_up,loss`` on one test point, and their sum per training class."""
        i = check_index(test_id, self.run.n_test, "test")
        scores = self.run.scores([i], ihvp=ihvp)[:, 0]  # (n_train,)
        by_class = np.bincount(self.run.dataset.y_train, weights=scores,
                               minlength=self.run.dataset.n_classes)
        return {"test_id": i, "ihvp": ihvp or self.run.default_method.value,
                "scores": scores.tolist(), "by_class": by_class.tolist()}

    # ------------------------------------------------------------------ training points
    def _self_order(self, ihvp: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Self-influence (n,) and the ids ranked by its magnitude, largest first."""
        s = self.run.self_influence(ihvp)
        return s, self.run.cache.get(("self-rank", ihvp or self.run.default_method.value),
                                lambda: np.argsort(-np.abs(s), kind="stable"))

    def train_point(self, train_id: int, *, ihvp: str | None = None) -> dict[str, Any]:
        i = check_index(train_id, self.run.n_train, "train")
        s, order = self._self_order(ihvp)
        rank = int(np.flatnonzero(order == i)[0]) + 1
        proba = self.run.predictions("train")[i]
        return {"train_id": i, "label": int(self.run.dataset.y_train[i]),
                "predicted": int(proba.argmax()), "probabilities": proba.tolist(),
                "self_influence": float(s[i]), "rank": rank, "n_train": self.run.n_train,
                "train_loss": float(self.run.train_losses()[i]),
                "grad_norm": float(self.run.gradient_norms()[i]),
                "ihvp": ihvp or self.run.default_method.value}

    def train_point_influence(self, train_id: int, *, top: int = DEFAULT_TOP, ihvp: str | None = None
                              ) -> dict[str, Any]:
        """The test points whose loss up-weighting this training point lowers most (helpful) and
        raises most (harmful)."""
        i = check_index(train_id, self.run.n_train, "train")
        k = min(_check_top(top), self.run.n_test)
        scores = self.run.train_influence(i, ihvp=ihvp)  # (n_test,)
        order = np.argsort(scores, kind="stable")
        pred, y = self._test_predicted(), self.run.dataset.y_test

        def rows(ids: np.ndarray) -> list[dict[str, Any]]:
            return [{"test_id": int(j), "score": float(scores[j]), "label": int(y[j]),
                     "predicted": int(pred[j])} for j in ids]

        return {"train_id": i, "ihvp": ihvp or self.run.default_method.value,
                "helpful": rows(order[:k]), "harmful": rows(order[::-1][:k])}

    def self_influence_ranking(self, *, top: int = DEFAULT_LIMIT, offset: int = 0,
                               ihvp: str | None = None, by: str = "self_influence") -> dict[str, Any]:
        """Training points ranked by |self-influence| (likely mislabelled first), one page; ``by``
        ranks by a simple baseline instead (``loss``: training loss, ``grad_norm``: gradient
        norm), which on convex models find mislabels about as well. Every item carries all three."""
        if by not in RANKINGS:
            raise QueryError(f"unknown ranking {by!r}: use one of {', '.join(RANKINGS)}")
        s, order = self._self_order(ihvp)
        loss, norm = self.run.train_losses(), self.run.gradient_norms()
        if by != "self_influence":
            values = loss if by == "loss" else norm
            order = self.run.cache.get((f"{by}-rank",), lambda: np.argsort(-values, kind="stable"))
        page = order[_page(len(order), offset, top)]
        proba = self.run.predictions("train")
        y = self.run.dataset.y_train
        return {"ihvp": ihvp or self.run.default_method.value, "by": by, "total": self.run.n_train,
                "offset": offset, "limit": top,
                "items": [{"rank": offset + r + 1, "train_id": int(i), "self_influence": float(s[i]),
                           "train_loss": float(loss[i]), "grad_norm": float(norm[i]),
                           "label": int(y[i]), "predicted": int(proba[i].argmax()),
                           "confidence": float(proba[i].max())} for r, i in enumerate(page)]}

    def train_point_params(self, train_id: int, *, ihvp: str | None = None) -> dict[str, Any]:
        """``I_up,params`` of one training point, summarised per parameter tensor (which layers
        up-weighting it moves most); the full vector is ``influence params`` on the CLI."""
        i = check_index(train_id, self.run.n_train, "train")
        vec = self.run.params(i, ihvp=ihvp)  # (p,) in named_parameters() order
        obj = self.run.model.objective
        layers, start = [], 0
        for name, shape, numel in zip(obj.names, obj.shapes, obj.numels):
            part = vec[start : start + numel]
            start += numel
            layers.append({"name": name, "shape": list(shape), "numel": numel,
                           "norm": float(np.linalg.norm(part)), "max_abs": float(np.abs(part).max()),
                           "rms": float(np.sqrt(np.mean(part**2)))})
        total = float(np.linalg.norm(vec))
        for layer in layers:
            layer["share"] = layer["norm"] ** 2 / total**2 if total > 0 else 0.0  # of ‖I‖²
        return {"train_id": i, "ihvp": ihvp or self.run.default_method.value, "norm": total,
                "layers": layers}

    def trust(self) -> dict[str, Any]:
        """The run's saved trust check (``influence trust``), or ``checked: false``."""
        report = load_trust(self.run)
        if report is None:
            return {"checked": False,
                    "how": f"influence trust --run {self.run.path} (retrains; minutes for networks)"}
        best = max((r for r in report["results"] if "pearson" in r), key=lambda r: r["pearson"],
                   default=None)
        return {"checked": True, "best": best, **report}

    # ------------------------------------------------------------------ reliability
    def lds_results(self) -> list[dict[str, Any]]:
        """The run's saved linear datamodeling scores (``influence lds``, the API's job), oldest first."""
        return load_lds(self.run)

    def mislabel(self) -> dict[str, Any] | None:
        """The run's saved mislabel check (AUC and recall against the recorded label flips), if any."""
        return load_mislabel(self.run)

    def brittleness(self) -> dict[str, Any] | None:
        """The run's saved brittleness search with its median k, if any."""
        report = load_brittleness(self.run)
        return None if report is None else {**report, "summary": brittleness_summary(report["results"])}

    def reliability(self) -> dict[str, Any]:
        """Every saved check of the run: leave-one-out trust, LDS, mislabel AUC, brittleness; the
        label noise the run was built with and the commands that compute each check. A saved file
        that cannot be read is reported in ``errors`` (and left out), not raised: the overview
        still shows everything else."""
        run, path = self.run, self.run.path
        saved: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, load, empty in (("lds", self.lds_results, []), ("mislabel", self.mislabel, None),
                                  ("brittleness", self.brittleness, None)):
            try:
                saved[name] = load()
            except InfluenceError as exc:
                saved[name], errors[name] = empty, " ".join(str(exc).split())
        data = run.info.data
        return {"trust": self.trust(), **saved, "errors": errors,
                "label_noise": {"fraction": data.label_noise, "n_flipped": data.n_flipped},
                "commands": {"lds": f"influence lds --run {path}",
                             "mislabels": f"influence mislabels --run {path}",
                             "brittleness": f"influence brittleness --run {path}",
                             "label_noise": "influence build ... --label-noise 0.1"}}

    # ------------------------------------------------------------------ groups and uploads
    def group(self, train_ids: Sequence[int], test_ids: Sequence[int], *, order: int = 1,
              ihvp: str | None = None) -> dict[str, Any]:
        return group_influence(self.run, train_ids, test_ids, order=order, ihvp=ihvp).to_dict()

    def group_members(self, *, by: str, label: int | None = None, fraction: float = 1.0,
                      top: int | None = None, clusters: int = DEFAULT_CLUSTERS, cluster: int | None = None,
                      seed: int = 0) -> dict[str, Any]:
        """Training ids of a group: ``class`` (the first ``fraction`` of class ``label``, in id
        order), ``mislabels`` (the ``top`` by |self-influence|), or ``cluster`` (k-means with
        ``clusters`` centres on the inputs, seeded; members of centre ``cluster``)."""
        run = self.run
        if not 0.0 < fraction <= 1.0:
            raise QueryError(f"fraction must be in (0, 1], got {fraction}")
        if by == "class":
            if label is None or not 0 <= label < run.dataset.n_classes:
                raise QueryError(f"label must be a class 0..{run.dataset.n_classes - 1}, got {label}")
            ids = np.flatnonzero(run.dataset.y_train == label)
        elif by == "mislabels":
            ids = self._self_order(None)[1][: top or DEFAULT_TOP]
        elif by == "cluster":
            if not 2 <= clusters <= MAX_CLUSTERS or cluster is None or not 0 <= cluster < clusters:
                raise QueryError(f"cluster needs clusters in 2..{MAX_CLUSTERS} and cluster in 0..clusters-1")
            if clusters > run.n_train:
                raise QueryError(f"clusters ({clusters}) cannot exceed the {run.n_train} training points")
            assign = run.cache.get(("kmeans", clusters, seed), lambda: self._kmeans(clusters, seed))
            ids = np.flatnonzero(assign == cluster)
        else:
            raise QueryError(f"unknown group selection {by!r}: use class, mislabels or cluster")
        ids = ids[: max(1, round(fraction * len(ids)))] if len(ids) else ids
        return {"by": by, "train_ids": [int(i) for i in ids], "size": len(ids)}

    def _kmeans(self, k: int, seed: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        x = self.run.dataset.x_train.reshape(self.run.n_train, -1)
        return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)

    def group_check(self, train_ids: Sequence[int], test_ids: Sequence[int], *,
                    ihvp: str | None = None) -> dict[str, Any]:
        """First- and second-order predictions against actually retraining without the group.
        Convex models only (seconds at most, so it can answer within a request); a network's
        retraining takes minutes: use ``influence group --check`` for it."""
        run = self.run
        n_params = run.model.n_params
        if not run.info.model.convex or n_params > run.config.train.newton_max_params:
            raise QueryError(f"retraining a {run.info.model.kind.value} ({n_params} "
                             "parameters) takes minutes: check it with `influence group --check`")
        first = self.group(train_ids, test_ids, order=1, ihvp=ihvp)
        second = self.group(train_ids, test_ids, order=2, ihvp=ihvp)
        truth = group_removal(run, [int(i) for i in set(train_ids)], list(test_ids))
        actual = np.asarray(truth["actual"])
        p1 = np.array([r["predicted_loss_change"] for r in first["results"]])
        p2 = np.array([r["predicted_loss_change"] for r in second["results"]])
        return {"group_size": first["group_size"], "ihvp": first["ihvp"],
                "ground_truth": truth["ground_truth"], "seconds": truth["seconds"],
                "results": [{"test_id": int(t), "first_order": float(a), "second_order": float(b),
                             "actual": float(c)} for t, a, b, c in zip(test_ids, p1, p2, actual)],
                "mean_abs_error": {"first_order": float(np.abs(p1 - actual).mean()),
                                   "second_order": float(np.abs(p2 - actual).mean())},
                "mean_abs_actual": float(np.abs(actual).mean())}

    def query(self, data: bytes, *, max_bytes: int, top: int = DEFAULT_TOP, ihvp: str | None = None,
              label: int | None = None, invert: bool = False) -> dict[str, Any]:
        """Explain an uploaded PNG/JPEG: its prediction and the helpful and harmful training points."""
        _check_top(top)
        x = decode_upload(data, input_shape=self.run.dataset.input_shape, value_range=self.value_range,
                          max_bytes=max_bytes, invert=invert)
        result = self.run.explain_input(x, label=label, top=top, ihvp=ihvp)
        # the input as the model sees it (resized, converted), for the page to show
        result["input_png"] = png_data_url(x)
        return result
