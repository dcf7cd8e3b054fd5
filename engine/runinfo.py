"""``run.json`` as typed metadata: what a run folder is, read and checked in one place.

Layout of a run folder: ``run.json`` (this metadata; written last, so a folder without it is not
a run), ``model.pt`` (θ̂), ``model.ts`` (a user TorchScript model), ``grads.npy`` +
``manifest.json`` (the gradient store), ``curvature.pt`` (the dense or projected curvature).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BuildConfig, ModelKind
from .errors import RunError
from .store.files import load_json

__all__ = ["CURVATURE_FILE", "RUN_FILE", "RUN_SCHEMA", "SCRIPT_FILE", "THETA_FILE", "DataInfo",
           "ModelInfo", "RunInfo", "read_run_info"]

RUN_FILE = "run.json"
THETA_FILE = "model.pt"
SCRIPT_FILE = "model.ts"
CURVATURE_FILE = "curvature.pt"
RUN_SCHEMA = 1


@dataclass(frozen=True)
class DataInfo:
    """The data a run was built on."""

    source: str
    fingerprint: str
    n_train: int
    n_test: int
    input_shape: tuple[int, ...]
    n_classes: int
    class_names: tuple[str, ...]
    label_noise: float = 0.0  # the fraction of training labels flipped on purpose (--label-noise)
    n_flipped: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """The model at θ̂: its kind (which says whether it is convex), size, dtype and fingerprint."""

    kind: ModelKind
    spec: str
    n_params: int
    dtype: str
    fingerprint: str
    parameters: tuple[dict[str, Any], ...] = ()

    @property
    def convex(self) -> bool:
        return self.kind.convex


@dataclass(frozen=True)
class RunInfo:
    """The content of ``run.json``, typed. ``raw`` keeps the whole document (for exports)."""

    config: BuildConfig
    data: DataInfo
    model: ModelInfo
    training: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    curvature: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: Path | str = RUN_FILE) -> RunInfo:
        """Parse and check a ``run.json`` document; a :class:`RunError` names what is wrong."""
        if not isinstance(d, dict) or d.get("schema_version") != RUN_SCHEMA:
            found = d.get("schema_version") if isinstance(d, dict) else None
            raise RunError(f"{where}: run schema {found} is not {RUN_SCHEMA}; rebuild it")
        try:
            data, model = d["data"], d["model"]
            return cls(
                config=BuildConfig.from_dict(d["config"]),
                data=DataInfo(source=str(data["source"]), fingerprint=str(data["fingerprint"]),
                              n_train=int(data["n_train"]), n_test=int(data["n_test"]),
                              input_shape=tuple(int(s) for s in data["input_shape"]),
                              n_classes=int(data["n_classes"]),
                              class_names=tuple(str(c) for c in data.get("class_names", ())),
                              label_noise=float(data.get("label_noise", 0.0)),
                              n_flipped=int(data.get("n_flipped", 0))),
                model=ModelInfo(kind=ModelKind(model["kind"]), spec=str(model["spec"]),
                                n_params=int(model["n_params"]), dtype=str(model["dtype"]),
                                fingerprint=str(model["fingerprint"]),
                                parameters=tuple(model.get("parameters", ()))),
                training=dict(d.get("training", {})), store=dict(d.get("store") or {}),
                curvature=dict(d.get("curvature") or {}), timings=dict(d.get("timings", {})),
                raw=d,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{where}: malformed ({type(exc).__name__}: {exc}); rebuild the run") from exc

    def to_dict(self) -> dict[str, Any]:
        return self.raw


def read_run_info(folder: Path) -> RunInfo:
    """The checked metadata of the run in ``folder``; refuses a folder that is not a run."""
    path = folder / RUN_FILE
    if not path.is_file():
        raise RunError(f"{folder}: not a run folder (no {RUN_FILE}); build one with `influence build`")
    return RunInfo.from_dict(load_json(path), where=path)
