/* influence dashboard: small DOM helpers the page scripts share: build elements, plurals, the
   toast at the bottom of the page, busy buttons, and "Copy link". Exposed as window.influence.dom. */
(function () {
  "use strict";

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

  /* "Audit 2025-01-31 14:05": the title of an audit started without one */
  function defaultTitle() {
    var d = new Date();
    function two(x) { return (x < 10 ? "0" : "") + x; }
    return "Audit " + d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) +
      " " + two(d.getHours()) + ":" + two(d.getMinutes());
  }

  /* the toast at the bottom of the page: what an action did, or why it failed */
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

  function busy(button, on) {
    if (!button) { return; }
    button.disabled = on;
    button.classList.toggle("busy", on);
  }

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

  /* copy text to the clipboard; the button says whether it worked */
  function copy(text, button) {
    button.dataset.copied = text;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { flash(button, "✓ copied"); },
                                               function () { fallbackCopy(text, button); });
    } else {
      fallbackCopy(text, button);
    }
  }

  window.influence = window.influence || {};
  window.influence.dom = { el: el, plural: plural, defaultTitle: defaultTitle, toast: toast,
                           busy: busy, copy: copy };
})();
