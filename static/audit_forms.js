/* influence dashboard: the forms that add to an audit ("Add to audit" cards, the mislabel
   review's one-click marks), "Copy link" buttons, and an audit's permalink page, where the
   browser holding the edit token may rename the audit and remove items (read-only otherwise).
   Adds through window.influence.audits (static/audit.js). */
(function () {
  "use strict";

  var storage = window.influence.storage;
  var http = window.influence.http;
  var dom = window.influence.dom;
  var audits = window.influence.audits;
  var el = dom.el;

  function confirmAdded(what, audit) {
    dom.toast(["Added " + what + " to ", el("a", { href: audit.url, text: audit.title }),
               " · " + dom.plural(audit.n, "item") + " · ",
               el("a", { href: audit.url, "class": "open-audit", text: "open audit" })]);
  }

  function failed(err) {
    var hint = err.status === 403 || err.status === 404
      ? " · forget it in the header, or start a new audit there" : "";
    dom.toast(["Could not add to the audit: " + err.message + hint], true);
  }

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
               what: "a group of " + dom.plural(members.length, "training point") };
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
        dom.busy(submit, true);
        audits.add(made.item, newTitle).then(function (audit) {
          if (form.elements.note) { form.elements.note.value = ""; }
          confirmAdded(made.what, audit);
        }, failed).then(function () { dom.busy(submit, false); });
      });
    });

    // the mislabel review: one click marks a tile mislabelled, the predicted label as suggestion
    document.querySelectorAll("button[data-audit-mark]").forEach(function (button) {
      button.addEventListener("click", function () {
        var item = { kind: "mislabel", train_id: intOrNull(button.dataset.trainId), verdict: "mislabelled",
                     suggested_label: intOrNull(button.dataset.suggested), note: "" };
        dom.busy(button, true);
        audits.add(item, "Mislabel review " + dom.defaultTitle().slice(6)).then(function (audit) {
          button.textContent = "✓ marked";
          button.classList.add("marked");
          confirmAdded("training point #" + item.train_id + " (mislabelled)", audit);
        }, failed).then(function () { dom.busy(button, false); });
      });
    });
  }

  /* "Copy link" copies the page's URL (on a permalink page, without query or fragment) */
  function setUpCopyButtons(permalink) {
    document.querySelectorAll("button[data-copy=page]").forEach(function (button) {
      button.addEventListener("click", function () {
        dom.copy(permalink ? window.location.origin + window.location.pathname : window.location.href, button);
      });
    });
  }

  function setUpPermalink(panel) {
    var slug = panel.dataset.slug;
    var audit = storage.held(slug);
    if (!audit) { return; }  // read-only: this browser does not hold the edit token
    var items = document.querySelectorAll(".audit-item[data-item-id]");
    var heading = document.querySelector("header h1");
    storage.update(slug, { n: items.length, title: heading ? heading.textContent.trim() : audit.title });
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
      dom.busy(submit, true);
      http.api("PATCH", "/api/v1/audits/" + encodeURIComponent(slug), { title: title }, audit.token)
        .then(function (res) {
          if (heading) { heading.textContent = res.title; }
          document.title = "audit · " + res.title;
          storage.update(slug, { title: res.title });
          say("saved");
        }, function (err) { say("Could not rename: " + err.message, true); })
        .then(function () { dom.busy(submit, false); });
    });
    var makeCurrent = panel.querySelector(".make-current");
    function showCurrent() { makeCurrent.hidden = storage.load().current === slug; }
    makeCurrent.addEventListener("click", function () {
      storage.makeCurrent(slug);
      showCurrent();
      say("the dashboard's \"Add to audit\" buttons now add to this audit");
    });
    showCurrent();

    items.forEach(function (section) {
      var button = el("button", { type: "button", "class": "remove-item", text: "remove item",
                                  title: "remove this item from the audit" });
      section.insertBefore(button, section.firstChild);
      button.addEventListener("click", function () {
        dom.busy(button, true);
        http.api("DELETE", "/api/v1/audits/" + encodeURIComponent(slug) + "/items/" +
                 encodeURIComponent(section.dataset.itemId), undefined, audit.token)
          .then(function () { window.location.reload(); },  // positions renumber
                function (err) { say("Could not remove the item: " + err.message, true); dom.busy(button, false); });
      });
    });
  }

  var panel = document.getElementById("audit-edit");
  setUpAddForms();
  setUpCopyButtons(!!panel);
  if (panel) { setUpPermalink(panel); }
})();
