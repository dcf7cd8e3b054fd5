/* influence dashboard: follow a background job (a POST that answers 202 with one) until it ends,
   and cancel it. follow(jobId, on) polls GET /api/v1/jobs/{id} every POLL_MS and calls
     on.progress(job)  while it is queued or running (not while a cancel is under way),
     on.done(job), on.failed(job) or on.cancelled(job) once when it ends (status "done"; "error";
       "error" with error_kind "cancelled", given to on.failed when there is no on.cancelled),
     on.lost(err)  when the job cannot be read (the server gone, a forgotten job) or a callback threw;
   optional: on.bar, a <progress> kept in step with the job; on.cancel, a Cancel button shown while
   the job runs, and on.say(message, isError), the status line where the cancel says how it went.
   A callback may return a promise (a refresh after "done"): its failure goes to on.lost.
   cancel(jobId) sends DELETE /api/v1/jobs/{id} (the job stops at its next progress report) and
   resolves with the job. Exposed as window.influence.jobs. */
(function () {
  "use strict";

  var POLL_MS = 500;

  var http = window.influence.http;  // static/lib/http.js

  function jobUrl(jobId) { return "/api/v1/jobs/" + encodeURIComponent(jobId); }

  function isCancelled(job) { return job.status === "error" && job.error_kind === "cancelled"; }

  function cancel(jobId) { return http.guardedApi("DELETE", jobUrl(jobId)); }

  function showProgress(bar, job) {
    var p = job.progress || {};
    if (job.status === "done") {
      bar.value = bar.max;
    } else if (p.total) {
      bar.max = p.total;
      bar.value = p.done;
    } else {
      bar.removeAttribute("value");
    }
  }

  function follow(jobId, on) {
    var button = on.cancel;
    var cancelling = false;
    var cancelError = false;  // a refused cancel stays on the status line until the next try

    function ended() {
      if (button) { button.hidden = true; button.onclick = null; }
    }

    function requestCancel() {
      cancelling = true;
      cancelError = false;
      button.disabled = true;
      on.say("Cancelling…");
      cancel(jobId).catch(function (err) {
        cancelling = false;
        cancelError = true;
        button.disabled = false;
        on.say("Could not cancel the job: " + err.message, true);
      });
    }

    function step(job) {
      if (on.bar) { showProgress(on.bar, job); }
      if (job.status === "done") { ended(); return on.done(job); }
      if (job.status === "error") {
        ended();
        return isCancelled(job) && on.cancelled ? on.cancelled(job) : on.failed(job);
      }
      if (cancelling) {
        on.say("Cancelling…");
      } else if (!cancelError) {
        on.progress(job);
      }
      window.setTimeout(poll, POLL_MS);
      return null;
    }

    function poll() {
      http.api("GET", jobUrl(jobId)).then(step).catch(function (err) { ended(); on.lost(err); });
    }

    if (button) {
      button.hidden = false;
      button.disabled = false;
      button.onclick = requestCancel;
    }
    poll();
  }

  window.influence.jobs = { follow: follow, cancel: cancel, isCancelled: isCancelled };
})();
