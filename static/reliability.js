/* influence dashboard: the overview's reliability jobs (LDS, mislabel check, brittleness). Each
   form[data-job-url] POSTs its fields as JSON to that route (202: a background job), follows the
   job (static/lib/jobs.js) and shows its progress in the form's status line (role="status", so
   screen readers hear it), then fetches the overview again and swaps in the fresh results
   (the element named by data-refresh), without reloading the page. A status line with a
   button.job-cancel offers to cancel the running job; the form can start it again afterwards.
   The form's data-doing and data-steps name its work in the progress line ("Scoring: 1 of 3
   done…") and in the cancel's ("Cancelled after 1 of 3 scores."); by default "Retraining" and
   "retrainings". */
(function () {
  "use strict";

  var http = window.influence.http;  // static/lib/http.js
  var dom = window.influence.dom;  // static/lib/dom.js
  var jobs = window.influence.jobs;  // static/lib/jobs.js: follows and cancels a job

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
    var stop = status.querySelector("button.job-cancel");  // where the template offers a Cancel
    var doing = form.getAttribute("data-doing") || "Retraining";
    var steps = form.getAttribute("data-steps") || "retrainings";

    function say(message, isError) {
      status.hidden = false;
      text.textContent = message;
      status.classList.toggle("error", !!isError);
    }

    function ended(message, isError) {
      say(message, isError);
      dom.busy(button, false);
    }

    function follow(job) {
      jobs.follow(job.id, {
        bar: bar, cancel: stop, say: say,
        progress: function (j) {
          var p = j.progress || {};
          say(j.status === "queued" ? "Waiting for another job to finish…"
              : p.total ? doing + ": " + p.done + " of " + p.total + " done…" : "Running…");
        },
        done: function (j) {
          return refresh(form.getAttribute("data-refresh")).then(function () {
            ended("Done in " + j.seconds.toFixed(1) + " s; the results above are updated.");
          });
        },
        failed: function (j) { ended("The job failed: " + j.error, true); },
        cancelled: function (j) {
          var p = j.progress || {};
          var hint = stop && stop.getAttribute("data-cancelled");  // what was kept, if anything
          ended("Cancelled" + (p.total ? " after " + p.done + " of " + p.total + " " + steps : "") + "." +
                (hint ? " " + hint : ""));
        },
        lost: function (err) { ended("Could not follow the job: " + err.message, true); }
      });
    }

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      dom.busy(button, true);
      bar.removeAttribute("value");
      say("Starting…");
      http.guardedApi("POST", form.getAttribute("data-job-url"), body(form)).then(
        follow, function (err) { ended("Could not start the job: " + err.message, true); });
    });
  }

  document.querySelectorAll("form[data-job-url]").forEach(setUp);
})();
