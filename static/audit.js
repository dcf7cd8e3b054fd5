/* influence dashboard: audits in the browser.

   The audits this browser may edit live in localStorage under KEY, each with its edit token:
   {"current": slug | null, "audits": {slug: {slug, token, title, url, n}}}. The token only ever
   travels in an Authorization header, never in a URL. This script runs on the dashboard pages
   (the audit widget in the header, "Add to audit" and "Copy link") and on an audit's permalink
   page (rename and remove items, shown only when this browser holds the audit's token). */
(function () {
  "use strict";

  var KEY = "influence.audits";

  // ------------------------------------------------------------------------------ storage
  function load() {
    try {
      var state = JSON.parse(window.localStorage.getItem(KEY) || "null");
      if (state && state.audits && typeof state.audits === "object") { return state; }
    } catch (e) { /* unreadable or blocked storage: start empty */ }
    return { current: null, audits: {} };
  }

  function save(state) {
    try { window.localStorage.setItem(KEY, JSON.stringify(state)); } catch (e) { /* blocked */ }
    renderWidget();
  }

  function current() {
    var state = load();
    return (state.current && state.audits[state.current]) || null;
  }

  function held(slug) { return load().audits[slug] || null; }

  function remember(entry, makeCurrent) {
    var state = load();
    state.audits[entry.slug] = entry;
    if (makeCurrent) { state.current = entry.slug; }
    save(state);
  }

  function update(slug, fields) {
    var state = load();
    var entry = state.audits[slug];
    if (!entry) { return; }
    Object.keys(fields).forEach(function (k) { entry[k] = fields[k]; });
    save(state);
  }

  function forget(slug) {
    var state = load();
    delete state.audits[slug];
    if (state.current === slug) { state.current = Object.keys(state.audits)[0] || null; }
    save(state);
  }

  // ------------------------------------------------------------------------------ API
  function describe(status, body) {
    var detail = body && body.detail;
    if (Array.isArray(detail)) {
      detail = detail.map(function (d) { return d && d.msg ? d.msg : String(d); }).join("; ");
    }
    var text = detail || "the server answered HTTP " + status;
    if (status === 403) { return "not allowed to edit this audit (HTTP 403): " + text; }
    if (status === 404) { return "not found (HTTP 404): " + text; }
    return text + " (HTTP " + status + ")";
  }

  /* fetch JSON; resolves with the parsed body, rejects with an Error whose message says why */
  function api(method, path, body, token) {
    var headers = { "Accept": "application/json" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    if (token) { headers.Authorization = "Bearer " + token; }
    return fetch(path, {
      method: method, headers: headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (response) {
      if (response.status === 204) { return null; }
      return response.json().catch(function () { return null; }).then(function (data) {
        if (!response.ok) {
          var err = new Error(describe(response.status, data));
          err.status = response.status;
          throw err;
        }
        return data;
      });
    }, function () { throw new Error("the dashboard server cannot be reached"); });
  }

  function defaultTitle() {
    var d = new Date();
    function two(x) { return (x < 10 ? "0" : "") + x; }
    return "Audit " + d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) +
      " " + two(d.getHours()) + ":" + two(d.getMinutes());
  }

  /* A write the server may guard with its team API key (creating an audit, starting a job):
     send the key this browser holds; when the server answers 403 asking for its key, ask the
     user once, keep the key in localStorage (never in a URL) and try again. */
  var TEAM_KEY = "influence.apiKey";

  function teamKey() {
    try { return window.localStorage.getItem(TEAM_KEY) || undefined; } catch (e) { return undefined; }
  }

  function guardedApi(method, path, body) {
    return api(method, path, body, teamKey()).catch(function (err) {
      if (err.status !== 403 || err.message.indexOf("API key") < 0) { throw err; }
      var key = (window.prompt("This dashboard server needs its team API key for this " +
                               "(kept in this browser only):") || "").trim();
      if (!key) { throw err; }
      try { window.localStorage.setItem(TEAM_KEY, key); } catch (e) { /* blocked storage */ }
      return api(method, path, body, key);
    });
  }

  function createAudit(title, items) {
    return guardedApi("POST", "/api/v1/audits", { title: title || defaultTitle(), items: items || [] })
      .then(function (res) {
        var entry = { slug: res.slug, token: res.edit_token, title: res.audit.title, url: res.url,
                      n: res.audit.items.length };
        remember(entry, true);
        return entry;
      });
  }

  /* add one item to the current audit, or create an audit with it when there is none */
  function addItem(item, newTitle) {
    var audit = current();
    if (!audit) { return createAudit(newTitle, [item]); }
    return api("POST", "/api/v1/audits/" + encodeURIComponent(audit.slug) + "/items", item, audit.token)
      .then(function (stored) {
        update(audit.slug, { n: stored.position });
        return held(audit.slug);
      });
  }

  // ------------------------------------------------------------------------------ small UI helpers
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  /* shared with the other page scripts (static/attack.js), which load after this one */
  window.influenceUI = { api: api, guardedApi: guardedApi, el: el, plural: plural };

  /* the toast at the bottom of the page: what an add did, or why it failed */
  function toast(parts, isError) {
    var box = document.getElementById("audit-toast");
    if (!box) { return; }
    var msg = box.querySelector(".toast-msg");
    msg.textContent = "";
    parts.forEach(function (p) { msg.appendChild(typeof p === "string" ? document.createTextNode(p) : p); });
    box.classList.toggle("error", !!isError);
    box.setAttribute("role", isError ? "alert" : "status");
    box.hidden = false;
  }

  function confirmAdded(what, audit) {
    toast(["Added " + what + " to ", el("a", { href: audit.url, text: audit.title }),
           " · " + plural(audit.n, "item") + " · ",
           el("a", { href: audit.url, "class": "open-audit", text: "open audit" })]);
  }

  function failed(err) {
    var hint = err.status === 403 || err.status === 404
      ? " · forget it in the header, or start a new audit there" : "";
    toast(["Could not add to the audit: " + err.message + hint], true);
  }

  function busy(button, on) {
    if (!button) { return; }
    button.disabled = on;
    button.classList.toggle("busy", on);
  }

  // ------------------------------------------------------------------------------ copy link
  function flash(button, text) {
    if (!button.dataset.label) { button.dataset.label = button.textContent; }
    button.textContent = text;
    button.classList.add("copied");
    window.clearTimeout(button._copyTimer);
    button._copyTimer = window.setTimeout(function () {
      button.textContent = button.dataset.label;
      button.classList.remove("copied");
    }, 2500);
  }

  /* headless or insecure pages may refuse the clipboard API: show the link in a selected,
     read-only input beside the button and try the old copy command */
  function fallbackCopy(text, button) {
    var input = button.parentNode.querySelector("input.copy-fallback");
    if (!input) {
      input = el("input", { type: "text", readonly: "", "class": "copy-fallback",
                            "aria-label": "link to copy" });
      button.parentNode.insertBefore(input, button.nextSibling);
    }
    input.value = text;
    input.hidden = false;
    input.focus();
    input.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    input.hidden = ok;  // copied: no need to keep it; otherwise it stays, selected, for Ctrl+C
    flash(button, ok ? "✓ copied" : "press Ctrl+C");
  }

  function copy(text, button) {
    button.dataset.copied = text;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { flash(button, "✓ copied"); },
                                               function () { fallbackCopy(text, button); });
    } else {
      fallbackCopy(text, button);
    }
  }

  // ------------------------------------------------------------------------------ the widget
  function renderWidget() {
    var state = load();
    var audit = current();
    renderTargets(audit);
    var widget = document.getElementById("audit-widget");
    if (!widget) { return; }
    widget.hidden = false;
    widget.querySelector(".aw-none").hidden = !!audit;
    widget.querySelector(".aw-current").hidden = !audit;
    if (audit) {
      var link = widget.querySelector(".aw-link");
      link.href = audit.url;
      link.textContent = audit.title;
      widget.querySelector(".aw-count").textContent = plural(audit.n || 0, "item");
    }
    var select = widget.querySelector(".aw-switch");
    var slugs = Object.keys(state.audits);
    select.hidden = slugs.length < 2;
    select.textContent = "";
    slugs.forEach(function (slug) {
      var opt = el("option", { value: slug, text: state.audits[slug].title });
      if (slug === state.current) { opt.selected = true; }
      select.appendChild(opt);
    });
    var forgetButton = widget.querySelector(".aw-forget");
    forgetButton.textContent = "Forget";
    delete forgetButton.dataset.armed;
  }

  /* under each "Add to audit" form: which audit it adds to, or the title of the one it will start */
  function renderTargets(audit) {
    document.querySelectorAll("[data-audit-target]").forEach(function (target) {
      target.querySelector(".to-current").hidden = !audit;
      target.querySelector(".to-new").hidden = !!audit;
      var input = target.querySelector("input[name=audit_title]");
      if (input) { input.placeholder = defaultTitle(); }
      if (audit) {
        var a = target.querySelector(".to-current a");
        a.href = audit.url;
        a.textContent = audit.title;
      }
    });
  }

  function setUpWidget() {
    var widget = document.getElementById("audit-widget");
    if (!widget) { return; }
    var form = widget.querySelector(".aw-new");
    var titleInput = form.querySelector("input[name=title]");
    var error = form.querySelector(".aw-error");

    widget.querySelectorAll(".aw-start").forEach(function (button) {
      button.addEventListener("click", function () {
        form.hidden = false;
        widget.classList.add("creating");
        error.textContent = "";
        titleInput.placeholder = defaultTitle();
        titleInput.focus();
      });
    });
    function closeForm() {
      form.hidden = true;
      widget.classList.remove("creating");
    }
    form.querySelector(".aw-cancel").addEventListener("click", closeForm);
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var submit = form.querySelector("button[type=submit]");
      busy(submit, true);
      createAudit(titleInput.value.trim()).then(function (audit) {
        closeForm();
        titleInput.value = "";
        toast(["Started the audit ", el("a", { href: audit.url, text: audit.title }),
               ": add test points and training points to it from their pages."]);
      }, function (err) {
        error.textContent = "Could not create the audit: " + err.message;
      }).then(function () { busy(submit, false); });
    });
    widget.querySelector(".aw-switch").addEventListener("change", function (e) {
      var state = load();
      if (state.audits[e.target.value]) { state.current = e.target.value; save(state); }
    });
    widget.querySelector(".aw-forget").addEventListener("click", function (e) {
      var button = e.currentTarget;
      var audit = current();
      if (!audit) { return; }
      if (!button.dataset.armed) {  // two clicks: forgetting loses the edit token for good
        button.dataset.armed = "1";
        button.textContent = "Forget? Its edit token is lost";
        return;
      }
      forget(audit.slug);
    });
    widget.querySelector(".aw-copy").addEventListener("click", function (e) {
      var audit = current();
      if (audit) { copy(window.location.origin + audit.url, e.currentTarget); }
    });
    var close = document.querySelector("#audit-toast .toast-close");
    if (close) {
      close.addEventListener("click", function () { document.getElementById("audit-toast").hidden = true; });
    }
    renderWidget();
  }

  // ------------------------------------------------------------------------------ add to audit
  function intOrNull(value) {
    return value === undefined || value === null || value === "" ? null : parseInt(value, 10);
  }

  function intList(value) {
    return (value || "").split(",").filter(function (v) { return v !== ""; }).map(function (v) { return parseInt(v, 10); });
  }

  /* a form with data-audit-add="test_point", "group" or "mislabel": its data attributes and fields make the item */
  function itemFromForm(form) {
    var d = form.dataset;
    var note = form.elements.note ? form.elements.note.value.trim() : "";
    if (d.auditAdd === "group") {
      var members = intList(d.trainIds);
      return { item: { kind: "group", train_ids: members, test_ids: intList(d.testIds), order: intOrNull(d.order),
                       note: note },
               what: "a group of " + plural(members.length, "training point") };
    }
    if (d.auditAdd === "test_point") {
      return { item: { kind: "test_point", test_id: intOrNull(d.testId), top: intOrNull(d.top),
                       ihvp: d.ihvp || null, note: note },
               what: "test point #" + d.testId };
    }
    var verdict = form.elements.verdict.value;
    return { item: { kind: "mislabel", train_id: intOrNull(d.trainId), verdict: verdict, note: note,
                     suggested_label: verdict === "mislabelled" ? intOrNull(form.elements.suggested_label.value) : null },
             what: "training point #" + d.trainId + (verdict === "mislabelled" ? " (mislabelled)" : " (fine)") };
  }

  function setUpAddForms() {
    document.querySelectorAll("form[data-audit-add]").forEach(function (form) {
      var verdicts = form.querySelectorAll("input[name=verdict]");
      var suggestion = form.elements.suggested_label;
      function syncSuggestion() {  // a suggested label only goes with "mislabelled"
        if (suggestion) { suggestion.disabled = form.elements.verdict.value !== "mislabelled"; }
      }
      verdicts.forEach(function (radio) { radio.addEventListener("change", syncSuggestion); });
      syncSuggestion();  // the browser may have restored the form
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        var submit = form.querySelector("button[type=submit]");
        var made = itemFromForm(form);
        var newTitle = form.elements.audit_title ? form.elements.audit_title.value.trim() : "";
        busy(submit, true);
        addItem(made.item, newTitle).then(function (audit) {
          if (form.elements.note) { form.elements.note.value = ""; }
          confirmAdded(made.what, audit);
        }, failed).then(function () { busy(submit, false); });
      });
    });

    // the mislabel review: one click marks a tile mislabelled, the predicted label as suggestion
    document.querySelectorAll("button[data-audit-mark]").forEach(function (button) {
      button.addEventListener("click", function () {
        var item = { kind: "mislabel", train_id: intOrNull(button.dataset.trainId), verdict: "mislabelled",
                     suggested_label: intOrNull(button.dataset.suggested), note: "" };
        busy(button, true);
        addItem(item, "Mislabel review " + defaultTitle().slice(6)).then(function (audit) {
          button.textContent = "✓ marked";
          button.classList.add("marked");
          confirmAdded("training point #" + item.train_id + " (mislabelled)", audit);
        }, failed).then(function () { busy(button, false); });
      });
    });

    document.querySelectorAll("button[data-copy=page]").forEach(function (button) {
      button.addEventListener("click", function () { copy(window.location.href, button); });
    });
  }

  // ------------------------------------------------------------------------------ the permalink page
  function setUpPermalink() {
    var panel = document.getElementById("audit-edit");
    if (!panel) { return; }
    var slug = panel.dataset.slug;
    document.querySelectorAll("button[data-copy=page]").forEach(function (button) {
      button.addEventListener("click", function () {
        copy(window.location.origin + window.location.pathname, button);
      });
    });
    var audit = held(slug);
    if (!audit) { return; }  // read-only: this browser does not hold the edit token
    var items = document.querySelectorAll(".audit-item[data-item-id]");
    var heading = document.querySelector("header h1");
    update(slug, { n: items.length, title: heading ? heading.textContent.trim() : audit.title });
    panel.hidden = false;

    var msg = panel.querySelector(".audit-msg");
    function say(text, isError) {
      msg.textContent = text;
      msg.classList.toggle("error", !!isError);
    }
    var form = panel.querySelector("form.audit-title");
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var title = form.elements.title.value.trim();
      if (!title) { say("a title cannot be empty", true); return; }
      var submit = form.querySelector("button[type=submit]");
      busy(submit, true);
      api("PATCH", "/api/v1/audits/" + encodeURIComponent(slug), { title: title }, audit.token)
        .then(function (res) {
          if (heading) { heading.textContent = res.title; }
          document.title = "audit · " + res.title;
          update(slug, { title: res.title });
          say("saved");
        }, function (err) { say("Could not rename: " + err.message, true); })
        .then(function () { busy(submit, false); });
    });
    var makeCurrent = panel.querySelector(".make-current");
    function showCurrent() { makeCurrent.hidden = load().current === slug; }
    makeCurrent.addEventListener("click", function () {
      var state = load();
      state.current = slug;
      save(state);
      showCurrent();
      say("the dashboard's \"Add to audit\" buttons now add to this audit");
    });
    showCurrent();

    items.forEach(function (section) {
      var button = el("button", { type: "button", "class": "remove-item", text: "remove item",
                                  title: "remove this item from the audit" });
      section.insertBefore(button, section.firstChild);
      button.addEventListener("click", function () {
        busy(button, true);
        api("DELETE", "/api/v1/audits/" + encodeURIComponent(slug) + "/items/" +
            encodeURIComponent(section.dataset.itemId), undefined, audit.token)
          .then(function () { window.location.reload(); },  // positions renumber
                function (err) { say("Could not remove the item: " + err.message, true); busy(button, false); });
      });
    });
  }

  setUpWidget();
  setUpAddForms();
  setUpPermalink();
  // another tab started, switched or forgot an audit
  window.addEventListener("storage", function (e) { if (e.key === KEY) { renderWidget(); } });
})();
