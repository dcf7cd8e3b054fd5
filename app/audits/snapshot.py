"""What an audit item records of the run when it is added, so a permalink shows what was seen
even after the run is rebuilt: numbers, labels, and the images themselves (small PNGs)."""

from __future__ import annotations

import base64
from typing import Any

from engine import QueryError

from ..images import png_bytes
from ..services import Dashboard, check_index
from .schemas import GroupItem, Item, MislabelItem, TestPointItem

__all__ = ["run_info", "snapshot"]

MAX_GROUP_IMAGES = 24  # a group item keeps the images of its first members only


def run_info(dash: Dashboard) -> dict[str, Any]:
    """The identity of the served run, recorded with each audit."""
    info = dash.run.info
    return {"path": str(dash.run.path), "data": info.data.source, "model": info.model.kind.value,
            "data_fingerprint": info.data.fingerprint,
            "model_fingerprint": info.model.fingerprint,
            "n_train": dash.run.n_train, "n_test": dash.run.n_test, "class_names": dash.class_names}


def _image(dash: Dashboard, split: str, i: int) -> str:
    data = dash.run.dataset.x_train if split == "train" else dash.run.dataset.x_test
    return base64.b64encode(png_bytes(data[i], min_side=1)).decode()


def _test_point(dash: Dashboard, item: TestPointItem) -> dict[str, Any]:
    view = dash.test_point_influence(item.test_id, top=item.top, ihvp=item.ihvp)
    images = {f"test/{item.test_id}": _image(dash, "test", item.test_id)}
    for row in view["helpful"] + view["harmful"]:
        images[f"train/{row['train_id']}"] = _image(dash, "train", row["train_id"])
    return {"test_id": item.test_id, "label": view["label"], "predicted": view["predicted"],
            "probabilities": view["probabilities"], "top": item.top, "ihvp": view["ihvp"]["method"],
            "helpful": view["helpful"], "harmful": view["harmful"], "images": images}


def _mislabel(dash: Dashboard, item: MislabelItem) -> dict[str, Any]:
    n_classes = len(dash.class_names)
    if item.suggested_label is not None and not 0 <= item.suggested_label < n_classes:
        raise QueryError(f"suggested_label {item.suggested_label} is out of range 0..{n_classes - 1}")
    point = dash.train_point(item.train_id)
    return {"train_id": item.train_id, "label": point["label"], "predicted": point["predicted"],
            "suggested_label": item.suggested_label, "verdict": item.verdict,
            "self_influence": point["self_influence"], "rank": point["rank"], "ihvp": point["ihvp"],
            "images": {f"train/{item.train_id}": _image(dash, "train", item.train_id)}}


def _group(dash: Dashboard, item: GroupItem) -> dict[str, Any]:
    result = dash.group(item.train_ids, item.test_ids, order=item.order)
    members = sorted(set(item.train_ids))
    for i in members[:MAX_GROUP_IMAGES]:
        check_index(i, dash.run.n_train, "train")
    return {"train_ids": members, "test_ids": item.test_ids, "order": item.order,
            "ihvp": result["ihvp"], "group_size": result["group_size"], "results": result["results"],
            "images": {f"train/{i}": _image(dash, "train", i) for i in members[:MAX_GROUP_IMAGES]}}


def snapshot(dash: Dashboard, item: Item) -> dict[str, Any]:
    """The item's record: the engine's answer now, with the images it shows."""
    if isinstance(item, TestPointItem):
        return _test_point(dash, item)
    if isinstance(item, MislabelItem):
        return _mislabel(dash, item)
    return _group(dash, item)
