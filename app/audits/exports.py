"""Exports of a saved audit: JSON, CSV (one row per item), relabel CSV, self-contained HTML."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

__all__ = ["CSV_COLUMNS", "RELABEL_COLUMNS", "to_csv", "to_json", "to_relabel_csv"]

CSV_COLUMNS = [
    "position", "item_id", "kind", "test_id", "train_id", "label", "predicted", "suggested_label",
    "verdict", "self_influence", "ihvp", "top", "helpful_train_ids", "helpful_scores",
    "harmful_train_ids", "harmful_scores", "group_train_ids", "group_test_ids", "group_order",
    "predicted_loss_changes", "note", "created_at",
]
RELABEL_COLUMNS = ["train_id", "label", "new_label", "label_name", "new_label_name", "note"]


def to_json(audit: dict[str, Any]) -> str:
    return json.dumps(audit, indent=2, ensure_ascii=False)


def _join(values: list[Any]) -> str:
    return ";".join(repr(v) if isinstance(v, float) else str(v) for v in values)


def _row(item: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in CSV_COLUMNS}
    row.update(position=item["position"], item_id=item["id"], kind=item["kind"], note=item["note"],
               created_at=item["created_at"], ihvp=item.get("ihvp", ""))
    if item["kind"] == "test_point":
        row.update(test_id=item["test_id"], label=item["label"], predicted=item["predicted"],
                   top=item["top"],
                   helpful_train_ids=_join([r["train_id"] for r in item["helpful"]]),
                   helpful_scores=_join([r["score"] for r in item["helpful"]]),
                   harmful_train_ids=_join([r["train_id"] for r in item["harmful"]]),
                   harmful_scores=_join([r["score"] for r in item["harmful"]]))
    elif item["kind"] == "mislabel":
        row.update(train_id=item["train_id"], label=item["label"], predicted=item["predicted"],
                   suggested_label="" if item["suggested_label"] is None else item["suggested_label"],
                   verdict=item["verdict"], self_influence=repr(item["self_influence"]))
    else:
        row.update(group_train_ids=_join(item["train_ids"]), group_test_ids=_join(item["test_ids"]),
                   group_order=item["order"],
                   predicted_loss_changes=_join([r["predicted_loss_change"] for r in item["results"]]))
    return row


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_csv(audit: dict[str, Any]) -> str:
    """One row per item, in order; lists are ``;``-separated (scores at full precision)."""
    return _csv(CSV_COLUMNS, [_row(it) for it in audit["items"]])


def to_relabel_csv(audit: dict[str, Any]) -> str:
    """``train_id,label,new_label,...`` for every training point marked mislabelled with a
    suggested label (the latest mark of a point wins; a later "fine" mark withdraws it)."""
    names = audit["run"].get("class_names") or []

    def name(k: int) -> str:
        return names[k] if 0 <= k < len(names) else str(k)

    latest: dict[int, dict[str, Any]] = {}
    for it in audit["items"]:
        if it["kind"] == "mislabel":
            latest[it["train_id"]] = it
    rows = []
    for train_id in sorted(latest):
        it = latest[train_id]
        if it["verdict"] != "mislabelled" or it["suggested_label"] is None:
            continue
        rows.append({"train_id": train_id, "label": it["label"], "new_label": it["suggested_label"],
                     "label_name": name(it["label"]), "new_label_name": name(it["suggested_label"]),
                     "note": it["note"]})
    return _csv(RELABEL_COLUMNS, rows)
