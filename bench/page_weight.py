"""Page weight: what a browser downloads for each dashboard page (its HTML plus every script and
stylesheet it loads), raw and gzip-compressed, and the size of an audit's self-contained HTML export.

Builds a digits logreg run (in a temporary folder unless ``--run`` names one), serves it in-process
with ``TestClient`` and fetches each page, then each ``<script src>`` and stylesheet the page names.
"gzip" is the bytes compressed here with gzip level 9 (what Starlette's ``GZipMiddleware`` sends by
default), so the figures do not depend on whether the server compresses. Cached assets are counted
on every page (a first visit). Prints a table and writes JSON (default bench/results/page_weight.json).

    python bench/page_weight.py
    python bench/page_weight.py --run runs/digits-logreg --out bench/results/page_weight.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGES = ["/", "/test-points", "/test-points/0", "/train-points/0", "/mislabels",
         "/groups?by=class&label=1", "/query"]
ASSET = re.compile(r'<script[^>]*\bsrc="([^"]+)"|<link rel="stylesheet" href="([^"]+)"')
GZIP_LEVEL = 9  # Starlette's GZipMiddleware default


def gz(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def assets_of(html: str) -> list[str]:
    """The same-origin scripts and stylesheets a page loads, in order, each once."""
    urls = [a or b for a, b in ASSET.findall(html)]
    return list(dict.fromkeys(u for u in urls if u.startswith("/")))


def page_weight(client: Any, path: str) -> dict[str, Any]:
    """Raw and gzip bytes of a page's HTML and of each asset it loads (a 404 asset fails)."""
    response = client.get(path)
    response.raise_for_status()
    parts = [{"url": path, "raw": len(response.content), "gzip": gz(response.content)}]
    for url in assets_of(response.text):
        asset = client.get(url)
        asset.raise_for_status()
        parts.append({"url": url, "raw": len(asset.content), "gzip": gz(asset.content)})
    return {"page": path, "parts": parts, "raw": sum(p["raw"] for p in parts),
            "gzip": sum(p["gzip"] for p in parts)}


def make_audit(client: Any) -> str:
    """An audit with one item of each kind; its slug."""
    items = [{"kind": "test_point", "test_id": 0, "top": 10},
             {"kind": "mislabel", "train_id": 3, "suggested_label": 1},
             {"kind": "group", "train_ids": [1, 2, 3, 4, 5], "test_ids": list(range(20))}]
    created = client.post("/api/v1/audits", json={"title": "page weight", "items": items})
    created.raise_for_status()
    return str(created.json()["slug"])


def measure(run: Path, db_url: str) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(run=run, database_url=db_url))) as client:
        slug = make_audit(client)
        pages = [page_weight(client, p) for p in [*PAGES, f"/audits/{slug}"]]
        export = client.get(f"/audits/{slug}.html")
        export.raise_for_status()
    return {"pages": pages, "export": {"url": "/audits/{slug}.html", "raw": len(export.content),
                                       "gzip": gz(export.content)},
            "gzip_level": GZIP_LEVEL}


def table(result: dict[str, Any]) -> str:
    def kb(n: int) -> str:
        return f"{n / 1000:,.1f}"

    lines = [f"{'page':34s} {'files':>5s} {'raw kB':>10s} {'gzip kB':>10s}   largest file"]
    for p in result["pages"]:
        big = max(p["parts"], key=lambda part: part["raw"])
        lines.append(f"{p['page']:34s} {len(p['parts']):5d} {kb(p['raw']):>10s} {kb(p['gzip']):>10s}"
                     f"   {big['url']} ({kb(big['raw'])} kB raw)")
    e = result["export"]
    lines.append(f"{'audit export (.html, one file)':34s} {1:5d} {kb(e['raw']):>10s} {kb(e['gzip']):>10s}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="an existing run (default: build digits logreg)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "page_weight.json")
    args = parser.parse_args()
    import engine

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "digits-logreg"
            engine.build("digits", "logreg", run, device="cpu", progress=False)
        result = measure(run, f"sqlite:///{Path(tmp) / 'audits.sqlite3'}")
    result["run"] = str(args.run or "digits logreg (temporary)")
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
