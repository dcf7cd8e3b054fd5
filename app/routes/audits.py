"""Audits: ``/api/v1/audits`` (JSON) and their permalinks and exports under ``/audits/{slug}``.

Reading needs only the slug (the permalink is unguessable); writing needs the edit token that
creation returned, or the server's API key, as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from .. import security
from ..audits import store
from ..audits.exports import to_csv, to_json, to_relabel_csv
from ..audits.report import render_report
from ..audits.schemas import AuditCreate, AuditUpdate, Item
from ..audits.snapshot import run_info, snapshot
from ..deps import AuditSessionDep, DashDep, SettingsDep, TemplatesDep, WriterDep
from ..limits import DEFAULT_LIMIT
from ..security import Authorization
from .params import ItemIdParam, LimitParam, OffsetParam, SlugParam

router = APIRouter(tags=["audits"])


def _view(sessions: Any, dash: Any, slug: str) -> dict[str, Any]:
    return store.to_dict(store.get_audit(sessions, slug), current_run=run_info(dash))


def _links(slug: str) -> dict[str, str]:
    return {"url": f"/audits/{slug}", "api_url": f"/api/v1/audits/{slug}",
            "html": f"/audits/{slug}.html", "json": f"/audits/{slug}.json",
            "csv": f"/audits/{slug}.csv", "relabel_csv": f"/audits/{slug}/relabel.csv"}


def _download(body: str, media_type: str, filename: str) -> Response:
    return Response(body, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _new_item(dash: Any, item: Item) -> store.NewItem:
    return item.kind, item.note, snapshot(dash, item)


@router.post("/api/v1/audits", status_code=201, dependencies=[WriterDep])
async def create_audit(body: AuditCreate, sessions: AuditSessionDep, dash: DashDep) -> dict[str, Any]:
    """Save an audit; answers its permalink and the edit token (shown only now: keep it)."""
    items = await run_in_threadpool(lambda: [_new_item(dash, it) for it in body.items])
    audit, token = await run_in_threadpool(
        store.create_audit, sessions, title=body.title, description=body.description,
        run_info=run_info(dash), items=items)
    return {"slug": audit.slug, "edit_token": token, **_links(audit.slug),
            "audit": store.to_dict(audit, current_run=run_info(dash))}


@router.get("/api/v1/audits")
def list_audits(sessions: AuditSessionDep, settings: SettingsDep, authorization: Authorization = None,
                offset: OffsetParam = 0, limit: LimitParam = DEFAULT_LIMIT) -> dict[str, Any]:
    """Every audit, newest first (needs the server's API key)."""
    if not security.carries_api_key(settings, authorization):
        raise store.Forbidden("listing audits needs the server's API key (INFLUENCE_API_KEY)")
    total, rows = store.list_audits(sessions, offset=offset, limit=limit)
    return {"total": total, "offset": offset, "limit": limit,
            "items": [{"slug": a.slug, "title": a.title, "n_items": len(a.items),
                       "created_at": a.created_at.isoformat(), **_links(a.slug)} for a in rows]}


@router.get("/api/v1/audits/{slug}")
def get_audit(slug: SlugParam, sessions: AuditSessionDep, dash: DashDep) -> dict[str, Any]:
    """The audit with its items in order, and whether the served run is the one it was saved on."""
    return _view(sessions, dash, slug)


@router.patch("/api/v1/audits/{slug}")
def update_audit(slug: SlugParam, body: AuditUpdate, sessions: AuditSessionDep, dash: DashDep,
                 settings: SettingsDep, authorization: Authorization = None) -> dict[str, Any]:
    """Change the title or description (needs the edit token)."""
    store.update_audit(sessions, slug, title=body.title, description=body.description,
                       bearer=security.bearer(authorization), api_key=security.api_key(settings))
    return _view(sessions, dash, slug)


@router.post("/api/v1/audits/{slug}/items", status_code=201)
def add_item(slug: SlugParam, item: Item, sessions: AuditSessionDep, dash: DashDep, settings: SettingsDep,
             authorization: Authorization = None) -> dict[str, Any]:
    """Add an item at the end (needs the edit token); answers the item as stored."""
    bearer, key = security.bearer(authorization), security.api_key(settings)
    store.authorize(store.get_audit(sessions, slug), bearer, api_key=key)  # before any engine work
    row = store.add_item(sessions, slug, _new_item(dash, item), bearer=bearer, api_key=key)
    items = _view(sessions, dash, slug)["items"]
    return next(it for it in items if it["id"] == row.id)


@router.delete("/api/v1/audits/{slug}/items/{item_id}", status_code=204)
def delete_item(slug: SlugParam, item_id: ItemIdParam, sessions: AuditSessionDep, settings: SettingsDep,
                authorization: Authorization = None) -> Response:
    """Remove one item (needs the edit token)."""
    store.delete_item(sessions, slug, item_id, bearer=security.bearer(authorization),
                      api_key=security.api_key(settings))
    return Response(status_code=204)


# ---------------------------------------------------------------------------------------------
# permalinks and exports (registered before /audits/{slug} so the suffixes are not taken as slugs)


@router.get("/audits/{slug}.json", include_in_schema=False)
def export_json(slug: SlugParam, sessions: AuditSessionDep, dash: DashDep) -> Response:
    return _download(to_json(_view(sessions, dash, slug)), "application/json", f"audit-{slug}.json")


@router.get("/audits/{slug}.csv", include_in_schema=False)
def export_csv(slug: SlugParam, sessions: AuditSessionDep, dash: DashDep) -> Response:
    return _download(to_csv(_view(sessions, dash, slug)), "text/csv", f"audit-{slug}.csv")


@router.get("/audits/{slug}/relabel.csv", include_in_schema=False)
def export_relabel(slug: SlugParam, sessions: AuditSessionDep, dash: DashDep) -> Response:
    return _download(to_relabel_csv(_view(sessions, dash, slug)), "text/csv", f"relabel-{slug}.csv")


@router.get("/audits/{slug}.html", include_in_schema=False)
def export_html(slug: SlugParam, sessions: AuditSessionDep, dash: DashDep,
                templates: TemplatesDep) -> Response:
    html = render_report(templates, _view(sessions, dash, slug), standalone=True)
    return HTMLResponse(html, headers={"Content-Disposition": f'attachment; filename="audit-{slug}.html"'})


@router.get("/audits/{slug}", include_in_schema=False)
def permalink(slug: SlugParam, sessions: AuditSessionDep, dash: DashDep,
              templates: TemplatesDep) -> Response:
    """The read-only view of an audit (a page)."""
    return HTMLResponse(render_report(templates, _view(sessions, dash, slug), standalone=False))

