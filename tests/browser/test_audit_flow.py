"""Audits in the browser (static/audit.js): start an audit from the header widget, add a test point,
a mislabel mark and tiles of the mislabel review, copy links; rename the audit and remove an item on
its permalink page; the permalink opened in a fresh browser is read-only and shows the same items;
the HTML export opens from disk with no network at all; a wrong edit token is refused with its
message, not silently."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import VIEWPORT, Tab

pytestmark = pytest.mark.browser

KEY = "influence.audits"  # the localStorage entry static/audit.js keeps
TEST_ID, TOP = 3, 5
TRAIN_ID = 11
TITLE = "Digits: the odd ones"
NOTES = {"test_point": "why does this 3 look like a 5?", "mislabel": "the given label looks wrong"}
CLIPBOARD = ["clipboard-read", "clipboard-write"]
ALL_IMAGES_LOADED = ("() => { const imgs = [...document.images];"
                     " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


@pytest.fixture
def new_tab(browser: Any, server_url: str, screenshot_dirs: list[Path]) -> Iterator[Callable[..., Tab]]:
    """Opens a tab in a new browser context (its own, empty localStorage); closes them all after."""
    contexts: list[Any] = []

    def make(**options: Any) -> Tab:
        context = browser.new_context(viewport=VIEWPORT, **options)
        context.set_default_timeout(30_000)
        contexts.append(context)
        tab = Tab(context.new_page(), server_url, screenshot_dirs)
        tab.watch()
        return tab

    yield make
    for context in contexts:
        context.close()


def held(tab: Tab) -> dict[str, Any]:
    """What this browser holds: {"current": slug, "audits": {slug: {slug, token, title, url, n}}}."""
    return json.loads(tab.page.evaluate(f"localStorage.getItem('{KEY}') || 'null'") or "null") or {}


def toast(tab: Tab, text: str) -> str:
    """Waits until the toast says ``text``; returns all it says."""
    tab.page.wait_for_function(
        "t => { const el = document.getElementById('audit-toast');"
        " return el && !el.hidden && el.innerText.includes(t); }", arg=text)
    return tab.page.locator("#audit-toast").inner_text()


def click_and_read_clipboard(tab: Tab, button: Any) -> str:
    button.click()
    tab.page.wait_for_function("b => b.textContent.includes('copied')", arg=button.element_handle())
    return str(tab.page.evaluate("navigator.clipboard.readText()"))


def api(tab: Tab, path: str) -> Any:
    response = tab.page.request.get(tab.base + path)
    assert response.ok, path
    return response.json()


# ---------------------------------------------------------------------------------------------
# the whole flow: make, share, edit, read elsewhere, export


def make_audit(owner: Tab) -> dict[str, Any]:
    """Start an audit in the widget and add four items through the pages; answers what was added."""
    page = owner.page
    owner.goto(f"/test-points/{TEST_ID}?top={TOP}")
    owner.wait_for_plots("probabilities")
    assert page.locator("#audit-widget .aw-none").is_visible()
    assert page.locator("form[data-audit-add] .to-new").is_visible()  # "this starts one titled ..."
    page.locator("#audit-widget .aw-none .aw-start").click()
    page.fill("#audit-widget .aw-new input[name=title]", TITLE)
    page.locator("#audit-widget .aw-new button[type=submit]").click()
    page.wait_for_selector("#audit-widget .aw-current:not([hidden])")
    assert page.locator("#audit-widget .aw-link").inner_text() == TITLE
    assert page.locator("#audit-widget .aw-count").inner_text() == "0 items"
    assert page.locator("form[data-audit-add] .to-current a").inner_text() == TITLE

    # the test point, as seen (top 5), with a note
    form = page.locator("form[data-audit-add=test_point]")
    form.locator("textarea[name=note]").fill(NOTES["test_point"])
    form.locator("button[type=submit]").click()
    assert "1 item" in toast(owner, f"test point #{TEST_ID}")
    assert form.locator("textarea[name=note]").input_value() == ""
    assert page.locator("#audit-widget .aw-count").inner_text() == "1 item"
    owner.screenshot("audit_add_test_point")
    # copy link: the page's full URL, which reproduces the view
    assert click_and_read_clipboard(owner, form.locator(".copy-link")) == page.url
    assert page.url.endswith(f"/test-points/{TEST_ID}?top={TOP}")

    # a training point marked mislabelled: the suggestion defaults to the model's prediction
    point = api(owner, f"/api/v1/train-points/{TRAIN_ID}")
    owner.goto(f"/train-points/{TRAIN_ID}")
    owner.wait_for_plots("probabilities")
    form = page.locator("form[data-audit-add=mislabel]")
    assert form.locator("select[name=suggested_label]").input_value() == str(point["predicted"])
    assert form.locator("input[name=verdict][value=mislabelled]").is_checked()
    suggested = (point["label"] + 1) % 10
    form.locator("select[name=suggested_label]").select_option(str(suggested))
    form.locator("textarea[name=note]").fill(NOTES["mislabel"])
    form.locator("button[type=submit]").click()
    assert "2 items" in toast(owner, f"training point #{TRAIN_ID} (mislabelled)")
    owner.screenshot("audit_add_mislabel")

    # the mislabel review: two quick marks (the second is removed on the permalink page later)
    owner.goto("/mislabels?limit=24")
    owner.loaded_images(".ranking img")
    tiles = page.locator(".ranking .tile.is-wrong .tile-mark")
    assert tiles.count() >= 2
    marks = []
    for i, n in ((0, 3), (1, 4)):
        button = tiles.nth(i)
        train_id = int(button.get_attribute("data-train-id") or "")
        marks.append({"train_id": train_id, "suggested": int(button.get_attribute("data-suggested") or "")})
        button.click()
        assert f"{n} items" in toast(owner, f"training point #{train_id}")
        assert button.inner_text() == "✓ marked"
    owner.screenshot("audit_mislabels_marked")

    state = held(owner)
    slug = state["current"]
    audit = state["audits"][slug]
    assert (audit["title"], audit["n"], audit["url"]) == (TITLE, 4, f"/audits/{slug}")
    # the widget's copy link is the permalink
    assert click_and_read_clipboard(owner, page.locator("#audit-widget .aw-copy")) == \
        f"{owner.base}/audits/{slug}"
    return {"slug": slug, "token": audit["token"], "suggested": suggested, "marks": marks}


def test_audit_made_in_the_dashboard_is_shared_read_only_and_exported(
        new_tab: Callable[..., Tab], tmp_path: Path) -> None:
    owner = new_tab(permissions=CLIPBOARD)
    urls: list[str] = []
    owner.page.on("request", lambda r: urls.append(r.url))
    made = make_audit(owner)
    slug, token = made["slug"], made["token"]
    assert not [u for u in urls if token in u]  # the edit token never goes into a URL
    owner.assert_clean()

    # the owner's permalink page: rename, remove the last item
    owner.goto(f"/audits/{slug}")
    owner.page.wait_for_selector("#audit-edit:not([hidden])")
    assert owner.page.locator(".audit-item .remove-item").count() == 4
    owner.page.fill("#audit-edit input[name=title]", TITLE + " (reviewed)")
    owner.page.locator("#audit-edit button[type=submit]").click()
    owner.page.wait_for_function("t => document.querySelector('header h1').textContent === t",
                                 arg=TITLE + " (reviewed)")
    with owner.page.expect_navigation(wait_until="networkidle"):  # removing reloads the page
        owner.page.locator(".audit-item").nth(3).locator(".remove-item").click()
    assert owner.page.locator(".audit-item").count() == 3
    assert owner.page.locator("header h1").inner_text() == TITLE + " (reviewed)"
    assert held(owner)["audits"][slug]["n"] == 3
    owner.page.wait_for_selector(".audit-item .plot .main-svg", state="attached")
    owner.screenshot("audit_permalink_owner")
    owner.assert_clean()

    # a fresh browser (no localStorage): read-only, the same items
    reader = new_tab()
    reader.goto(f"/audits/{slug}")
    check_audit_page(reader.page, made)
    assert reader.page.locator("#audit-edit").is_hidden()
    assert reader.page.locator(".remove-item, #audit-edit input, #audit-edit button").evaluate_all(
        "els => els.filter(e => e.offsetParent !== null).length") == 0
    assert held(reader) == {}
    reader.screenshot("audit_permalink")
    reader.assert_clean()

    # the HTML export, from disk, with every http(s) request blocked and recorded
    response = reader.page.request.get(f"{reader.base}/audits/{slug}.html")
    assert response.ok and "attachment" in response.headers["content-disposition"]
    path = tmp_path / f"audit-{slug}.html"
    path.write_bytes(response.body())
    offline = new_tab()
    requested: list[str] = []

    def block(route: Any) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            requested.append(route.request.url)
            route.abort()

    offline.page.context.route("**/*", block)
    offline.page.goto(path.as_uri(), wait_until="load")
    check_audit_page(offline.page, made)
    assert offline.page.locator("#audit-edit, .remove-item, .copy-link").count() == 0
    offline.screenshot("audit_export")
    assert requested == []
    offline.assert_clean()


def check_audit_page(page: Any, made: dict[str, Any]) -> None:
    """The audit as made in :func:`make_audit`, after its fourth item was removed."""
    items = page.locator(".audit-item")
    assert items.count() == 3
    assert items.evaluate_all("els => els.map(e => e.dataset.kind)") == ["test_point", "mislabel", "mislabel"]
    assert page.locator("header h1").inner_text() == TITLE + " (reviewed)"
    first, second, third = (items.nth(i) for i in range(3))
    assert re.search(rf"Test point {TEST_ID}\b", first.locator("h2").inner_text())
    assert first.locator(".note").inner_text() == NOTES["test_point"]
    assert first.locator("ol.thumbs.helpful img").count() == TOP
    assert re.search(rf"Training point {TRAIN_ID}\b.*mislabelled", second.locator("h2").inner_text())
    assert second.locator(".note").inner_text() == NOTES["mislabel"]
    mark = made["marks"][0]
    assert re.search(rf"Training point {mark['train_id']}\b", third.locator("h2").inner_text())
    assert third.locator(".note").count() == 0
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert page.evaluate("document.images.length") == 1 + 2 * TOP + 2
    page.wait_for_function("() => [...document.querySelectorAll('.audit-item .plot')]"
                           ".every(p => p.querySelector('.main-svg'))")
    assert page.locator(".audit-item .plot").count() == 1  # the test point's scores


# ---------------------------------------------------------------------------------------------
# first add, verdict "fine", forgetting, the clipboard fallback, a wrong token


def test_first_add_starts_an_audit_and_forget_drops_it(new_tab: Callable[..., Tab]) -> None:
    tab = new_tab()  # no clipboard permission: "Copy link" falls back to a selected input
    page = tab.page
    tab.goto(f"/train-points/{TRAIN_ID}")
    tab.wait_for_plots("probabilities")
    form = page.locator("form[data-audit-add=mislabel]")
    form.locator(".copy-link").click()
    page.wait_for_function("b => b.textContent.includes('copied')", arg=form.locator(".copy-link").element_handle())
    assert form.locator(".copy-link").get_attribute("data-copied") == page.url

    form.locator("input[name=verdict][value=fine]").check()
    assert form.locator("select[name=suggested_label]").is_disabled()
    form.locator("input[name=audit_title]").fill("Checked and fine")
    page.locator("#audit-widget .aw-none .aw-start").click()  # the widget's form, open for the picture
    tab.screenshot("audit_none")
    page.locator("#audit-widget .aw-cancel").click()
    form.locator("button[type=submit]").click()
    assert "1 item" in toast(tab, f"training point #{TRAIN_ID} (fine)")
    slug = held(tab)["current"]
    audit = api(tab, f"/api/v1/audits/{slug}")
    assert audit["title"] == "Checked and fine"
    [item] = audit["items"]
    assert (item["kind"], item["train_id"], item["verdict"], item["suggested_label"]) == \
        ("mislabel", TRAIN_ID, "fine", None)
    assert page.locator("#audit-widget .aw-link").inner_text() == "Checked and fine"

    # a second audit from the widget; the switch lists both
    page.locator("#audit-widget .aw-current .aw-start").click()
    page.locator("#audit-widget .aw-new button[type=submit]").click()  # empty title: a dated default
    page.wait_for_function("() => document.querySelector('#audit-widget .aw-count').textContent === '0 items'")
    assert page.locator("#audit-widget .aw-link").inner_text().startswith("Audit ")
    assert page.locator("#audit-widget .aw-switch option").count() == 2
    page.locator("#audit-widget .aw-switch").select_option(slug)
    assert page.locator("#audit-widget .aw-link").inner_text() == "Checked and fine"

    forget = page.locator("#audit-widget .aw-forget")
    forget.click()
    assert "token" in forget.inner_text()  # asks first: the edit token is lost
    forget.click()
    assert slug not in held(tab)["audits"] and len(held(tab)["audits"]) == 1
    forget.click()
    forget.click()
    assert held(tab)["audits"] == {}
    assert page.locator("#audit-widget .aw-none").is_visible()
    tab.assert_clean()


def test_a_wrong_edit_token_is_refused_with_its_message(new_tab: Callable[..., Tab]) -> None:
    tab = new_tab()
    page = tab.page
    tab.goto(f"/test-points/{TEST_ID}")
    created = page.request.post(f"{tab.base}/api/v1/audits", data={"title": "not yours"}).json()
    slug = created["slug"]
    tampered = {"current": slug, "audits": {slug: {"slug": slug, "token": "x" * 43, "title": "not yours",
                                                     "url": created["url"], "n": 0}}}
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [KEY, json.dumps(tampered)])
    tab.goto(f"/test-points/{TEST_ID}")
    tab.wait_for_plots("probabilities")

    tab.expected_status[f"/api/v1/audits/{slug}/items"] = 403
    page.locator("form[data-audit-add=test_point] textarea[name=note]").fill("should not be saved")
    page.locator("form[data-audit-add=test_point] button[type=submit]").click()
    text = toast(tab, "403")
    assert "Could not add" in text and "wrong edit token" in text
    assert page.locator("#audit-toast").get_attribute("role") == "alert"
    assert page.locator("#audit-toast.error").is_visible()
    # the note stays for another try
    assert page.locator("form[data-audit-add=test_point] textarea[name=note]").input_value() == "should not be saved"
    tab.screenshot("audit_wrong_token")

    # on the permalink page the edit controls show (the browser believes it holds the token),
    # and a rename is refused with its message
    tab.expected_status[f"/api/v1/audits/{slug}"] = 403
    tab.goto(f"/audits/{slug}")
    page.fill("#audit-edit input[name=title]", "renamed")
    page.locator("#audit-edit button[type=submit]").click()
    page.wait_for_selector("#audit-edit .audit-msg.error")
    assert "403" in page.locator("#audit-edit .audit-msg").inner_text()
    audit = api(tab, f"/api/v1/audits/{slug}")
    assert (audit["title"], audit["items"]) == ("not yours", [])
    tab.assert_clean()
