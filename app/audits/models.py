"""Tables of the audit database (SQLAlchemy 2 declarative; migrations in ``migrations/``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Audit", "AuditItem", "Base", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Audit(Base):
    """One saved audit. ``slug`` is the unguessable permalink; only a hash of the edit token is kept."""

    __tablename__ = "audits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    edit_token_hash: Mapped[str] = mapped_column(String(64))
    run_info: Mapped[dict[str, Any]] = mapped_column(JSON)  # run path, fingerprints, model, data
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    items: Mapped[list[AuditItem]] = relationship(
        back_populates="audit", order_by="AuditItem.id", cascade="all, delete-orphan", lazy="selectin")


class AuditItem(Base):
    """One finding. Items keep insertion order by ``id`` (an autoincrement key, so concurrent
    writers never compete for a position); ``data`` is the snapshot taken when it was added."""

    __tablename__ = "audit_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    note: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    audit: Mapped[Audit] = relationship(back_populates="items")
