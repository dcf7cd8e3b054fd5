/* influence dashboard: the overview's reliability jobs (LDS, mislabel check, brittleness). Each
   form[data-job-url] POSTs its fields as JSON to that route (202: a background job), polls the
   job's url every POLL_MS and shows its progress in the form's status line (role="status", so
   screen readers hear it), then fetches the overview again and swaps in the fresh results
   (the element named by data-refresh), without reloading the page. */
(function () {
  "use strict";

  var POLL_MS = 500;

  var http = window.influence.http;  // static/lib/http.js
  var dom = window.influence.dom;  // static/lib/dom.js

  /* the form's fields as the route's JSON body: numbers for number inputs, blanks left out */
  function body(form) {
    var out = {};
    Array.prototype.forEach.call(form.elements, function (field) {
      if (!field.name || field.disabled || field.value.trim() === "") { return; }
      out[field.name] = field.type === "number" ? Number(field.value) : field.value;
    });
    return out;
  }

  /* the element `id` of a freshly fetched copy of this page, swapped in for the current one */
  function refresh(id) {
    return fetch(window.location.pathname + window.location.search, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) { throw new Error("the page answered HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(id);
        var old = document.getElementById(id);
        if (fresh && old) { old.replaceWith(document.importNode(fresh, true)); }
      });
  }

  function setUp(form) {
    var status = form.nextElementSibling;  // the <p class="job-status"> after the form
    var bar = status.querySelector("progress");
    var text = status.querySelector(".job-text");
    var button = form.querySelector("button[type=submit]");

    function say(message, isError) {
      status.hidden = false;
      text.textContent = message;
      status.classList.toggle("error", !!isError);
    }

    function poll(url) {
      http.api("GET", url).then(function (job) {
        var p = job.progress || {};
        if (p.total) { bar.max = p.total; bar.value = p.done; } else { bar.removeAttribute("value"); }
        if (job.status === "done") {
          bar.value = bar.max;
          return refresh(form.getAttribute("data-refresh")).then(function () {
            say("Done in " + job.seconds.toFixed(1) + " s; the results above are updated.");
            dom.busy(button, false);
          });
        }
        if (job.status === "error") {
          say("The job failed: " + job.error, true);
          dom.busy(button, false);
          return null;
        }
        say(job.status === "queued" ? "Waiting for another job to finish…"
            : p.total ? "Retraining: " + p.done + " of " + p.total + " done…" : "Running…");
        window.setTimeout(function () { poll(url); }, POLL_MS);
        return null;
      }).catch(function (err) { say("Could not follow the job: " + err.message, true); dom.busy(button, false); });
    }

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      dom.busy(button, true);
      bar.removeAttribute("value");
      say("Starting…");
      http.guardedApi("POST", form.getAttribute("data-job-url"), body(form)).then(
        function (job) { poll(job.url); },
        function (err) { say("Could not start the job: " + err.message, true); dom.busy(button, false); });
    });
  }

  document.querySelectorAll("form[data-job-url]").forEach(setUp);
})();
