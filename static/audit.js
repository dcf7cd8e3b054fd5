/* influence dashboard: the audit this browser adds to, and the header widget that shows it.

   create() starts an audit (and makes it the current one); add() adds an item to the current
   audit, or starts one with it when there is none. The widget in the header shows the current
   audit with its item count, switches between the audits this browser holds, starts a new one
   and forgets one; under each "Add to audit" form, [data-audit-target] says where an add goes.
   Storage: static/lib/storage.js; HTTP: static/lib/http.js; the forms: static/audit_forms.js.
   Exposed as window.influence.audits. */
(function () {
  "use strict";

  var storage = window.influence.storage;
  var http = window.influence.http;
  var dom = window.influence.dom;
  var el = dom.el;

  function create(title, items) {
    return http.guardedApi("POST", "/api/v1/audits", { title: title || dom.defaultTitle(), items: items || [] })
      .then(function (res) {
        var entry = { slug: res.slug, token: res.edit_token, title: res.audit.title, url: res.url,
                      n: res.audit.items.length };
        storage.remember(entry, true);
        return entry;
      });
  }

  /* add one item to the current audit, or create an audit with it when there is none */
  function add(item, newTitle) {
    var audit = storage.current();
    if (!audit) { return create(newTitle, [item]); }
    return http.api("POST", "/api/v1/audits/" + encodeURIComponent(audit.slug) + "/items", item, audit.token)
      .then(function (stored) {
        storage.update(audit.slug, { n: stored.position });
        return storage.held(audit.slug);
      });
  }

  /* under each "Add to audit" form: which audit it adds to, or the title of the one it will start */
  function renderTargets(audit) {
    document.querySelectorAll("[data-audit-target]").forEach(function (target) {
      target.querySelector(".to-current").hidden = !audit;
      target.querySelector(".to-new").hidden = !!audit;
      var input = target.querySelector("input[name=audit_title]");
      if (input) { input.placeholder = dom.defaultTitle(); }
      if (audit) {
        var a = target.querySelector(".to-current a");
        a.href = audit.url;
        a.textContent = audit.title;
      }
    });
  }

  function renderWidget() {
    var state = storage.load();
    var audit = storage.current();
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
      widget.querySelector(".aw-count").textContent = dom.plural(audit.n || 0, "item");
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
        titleInput.placeholder = dom.defaultTitle();
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
      dom.busy(submit, true);
      create(titleInput.value.trim()).then(function (audit) {
        closeForm();
        titleInput.value = "";
        dom.toast(["Started the audit ", el("a", { href: audit.url, text: audit.title }),
                   ": add test points and training points to it from their pages."]);
      }, function (err) {
        error.textContent = "Could not create the audit: " + err.message;
      }).then(function () { dom.busy(submit, false); });
    });
    widget.querySelector(".aw-switch").addEventListener("change", function (e) {
      storage.makeCurrent(e.target.value);
    });
    widget.querySelector(".aw-forget").addEventListener("click", function (e) {
      var button = e.currentTarget;
      var audit = storage.current();
      if (!audit) { return; }
      if (!button.dataset.armed) {  // two clicks: forgetting loses the edit token for good
        button.dataset.armed = "1";
        button.textContent = "Forget? Its edit token is lost";
        return;
      }
      storage.forget(audit.slug);
    });
    widget.querySelector(".aw-copy").addEventListener("click", function (e) {
      var audit = storage.current();
      if (audit) { dom.copy(window.location.origin + audit.url, e.currentTarget); }
    });
    var close = document.querySelector("#audit-toast .toast-close");
    if (close) {
      close.addEventListener("click", function () { document.getElementById("audit-toast").hidden = true; });
    }
  }

  window.influence.audits = { create: create, add: add };
  storage.onChange(renderWidget);
  setUpWidget();
  renderWidget();
})();
