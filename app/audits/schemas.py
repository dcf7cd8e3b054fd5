"""Request bodies of the audit routes (the contract's item shapes, with a few optional extras)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..limits import (
    AUDIT_MAX_TESTS,
    AUDIT_MAX_TRAIN,
    DEFAULT_TOP,
    MAX_ITEM_TOP,
    MAX_ITEMS,
    MAX_NOTE,
    MAX_TITLE,
)

__all__ = ["MAX_ITEMS", "AuditCreate", "AuditUpdate", "GroupItem", "Item", "MislabelItem",
           "TestPointItem"]


def _storable(text: str) -> str:
    """Text every audit database can store: PostgreSQL refuses NUL characters, and a lone
    surrogate (``"\\ud800"`` is valid JSON) has no UTF-8 encoding (pydantic refuses it in some
    fields, not in optional ones)."""
    if "\x00" in text:
        raise ValueError("text cannot contain NUL characters (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode, not a lone surrogate (\\ud800..\\udfff)") from None
    return text


Text = Annotated[str, AfterValidator(_storable)]
Note = Annotated[Text, Field(default="", max_length=MAX_NOTE, description="free text")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TestPointItem(_Strict):
    """A test point; the server snapshots its prediction and helpful/harmful lists as seen now."""

    kind: Literal["test_point"]
    test_id: int
    note: Note = ""
    top: int = Field(default=DEFAULT_TOP, ge=1, le=MAX_ITEM_TOP, description="entries per list")
    ihvp: str | None = Field(default=None, description="IHVP method (default: the run's own)")


class MislabelItem(_Strict):
    """A training point judged mislabelled (with an optional suggested label) or fine."""

    kind: Literal["mislabel"]
    train_id: int
    suggested_label: int | None = None
    verdict: Literal["mislabelled", "fine"] = "mislabelled"
    note: Note = ""


class GroupItem(_Strict):
    """A group of training points with its influence on chosen test points."""

    kind: Literal["group"]
    train_ids: list[int] = Field(min_length=1, max_length=AUDIT_MAX_TRAIN)
    test_ids: list[int] = Field(min_length=1, max_length=AUDIT_MAX_TESTS)
    order: Literal[1, 2] = 1
    note: Note = ""


Item = Annotated[TestPointItem | MislabelItem | GroupItem, Field(discriminator="kind")]


class AuditCreate(_Strict):
    title: Text = Field(min_length=1, max_length=MAX_TITLE)
    description: Text = Field(default="", max_length=MAX_NOTE)
    items: list[Item] = Field(default_factory=list, max_length=MAX_ITEMS)


class AuditUpdate(_Strict):
    title: Text | None = Field(default=None, min_length=1, max_length=MAX_TITLE)
    description: Text | None = Field(default=None, max_length=MAX_NOTE)
