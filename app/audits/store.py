"""The only code that reads and writes audits. Each function is one transaction: an audit with
its first items is written whole or not at all, and an added item is committed before the call
returns."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from .models import Audit, AuditItem, utcnow

__all__ = ["AuditNotFound", "Forbidden", "NewItem", "add_item", "authorize", "create_audit",
           "delete_item", "get_audit", "list_audits", "new_token", "to_dict", "update_audit"]

SLUG_BYTES = 16  # 128 random bits: unguessable permalinks
TOKEN_BYTES = 24

NewItem = tuple[str, str, dict[str, Any]]  # (kind, note, snapshot)


class AuditNotFound(LookupError):
    """No audit has this slug (or this item id)."""


class Forbidden(PermissionError):
    """The request may read this audit but not change it."""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authorize(audit: Audit, bearer: str | None, *, api_key: str | None) -> None:
    """Allow a write with the audit's edit token or the server's API key; raise Forbidden otherwise."""
    if not bearer:
        raise Forbidden("editing this audit needs its edit token: send 'Authorization: Bearer <token>'")
    if hmac.compare_digest(_hash(bearer), audit.edit_token_hash):
        return
    if api_key and hmac.compare_digest(bearer.encode(), api_key.encode()):
        return
    raise Forbidden("wrong edit token for this audit")


def create_audit(sessions: sessionmaker[Session], *, title: str, description: str,
                 run_info: dict[str, Any], items: list[NewItem]) -> tuple[Audit, str]:
    """A new audit with its items, in one transaction; returns it and its edit token (shown once)."""
    token = new_token()
    with sessions.begin() as s:
        audit = Audit(slug=secrets.token_urlsafe(SLUG_BYTES), title=title, description=description,
                      edit_token_hash=_hash(token), run_info=run_info)
        audit.items = [AuditItem(kind=k, note=note, data=data) for k, note, data in items]
        s.add(audit)
    return get_audit(sessions, audit.slug), token


def _find(s: Session, slug: str) -> Audit:
    audit = s.scalars(select(Audit).where(Audit.slug == slug)).one_or_none()
    if audit is None:
        raise AuditNotFound(f"no audit {slug!r}")
    return audit


def get_audit(sessions: sessionmaker[Session], slug: str) -> Audit:
    with sessions() as s:
        audit = _find(s, slug)
        _ = list(audit.items)  # loaded before the session closes
        return audit


def add_item(sessions: sessionmaker[Session], slug: str, item: NewItem, *, bearer: str | None,
             api_key: str | None) -> AuditItem:
    kind, note, data = item
    with sessions.begin() as s:
        audit = _find(s, slug)
        authorize(audit, bearer, api_key=api_key)
        row = AuditItem(audit_id=audit.id, kind=kind, note=note, data=data)
        s.add(row)
        audit.updated_at = utcnow()
    return row


def update_audit(sessions: sessionmaker[Session], slug: str, *, title: str | None,
                 description: str | None, bearer: str | None, api_key: str | None) -> Audit:
    with sessions.begin() as s:
        audit = _find(s, slug)
        authorize(audit, bearer, api_key=api_key)
        if title is not None:
            audit.title = title
        if description is not None:
            audit.description = description
        audit.updated_at = utcnow()
    return get_audit(sessions, slug)


def delete_item(sessions: sessionmaker[Session], slug: str, item_id: int, *, bearer: str | None,
                api_key: str | None) -> None:
    with sessions.begin() as s:
        audit = _find(s, slug)
        authorize(audit, bearer, api_key=api_key)
        row = s.get(AuditItem, item_id)
        if row is None or row.audit_id != audit.id:
            raise AuditNotFound(f"audit {slug!r} has no item {item_id}")
        s.delete(row)
        audit.updated_at = utcnow()


def list_audits(sessions: sessionmaker[Session], *, offset: int, limit: int) -> tuple[int, list[Audit]]:
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Audit)) or 0
        rows = s.scalars(select(Audit).order_by(Audit.id.desc()).offset(offset).limit(limit)).all()
        for a in rows:
            _ = list(a.items)
        return total, list(rows)


def to_dict(audit: Audit, *, current_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit as JSON (no token); ``run_matches`` and ``warning`` compare it with the served run."""
    matches = None
    warning = None
    if current_run is not None:
        matches = all(audit.run_info.get(k) == current_run.get(k)
                      for k in ("data_fingerprint", "model_fingerprint"))
        if not matches:
            warning = ("this audit was saved on a different run (its data or model fingerprint "
                       "differs from the run served now): it shows what was seen then")
    return {
        "slug": audit.slug,
        "title": audit.title,
        "description": audit.description,
        "created_at": audit.created_at.isoformat(),
        "updated_at": audit.updated_at.isoformat(),
        "run": audit.run_info,
        "run_matches": matches,
        "warning": warning,
        "items": [{"id": it.id, "position": pos, "kind": it.kind, "note": it.note, **it.data,
                   "created_at": it.created_at.isoformat()}
                  for pos, it in enumerate(audit.items, start=1)],
    }
