/* influence dashboard, groups page: follow the retraining check's background job
   (static/lib/jobs.js) and reload the page when it ends; the page then shows the answer or the
   error. The box is #check-job, with data-job-id; its [data-job-state] says how the job is going.
   A job the server no longer knows (404: it restarted) is said as such; while the server does not
   answer, the box says so and tries again every RETRY_MS. */
(function () {
  "use strict";

  var RETRY_MS = 2000;

  var box = document.getElementById("check-job");
  if (!box) { return; }
  var state = box.querySelector("[data-job-state]");

  function reload() { window.location.reload(); }

  function follow() {
    window.influence.jobs.follow(box.getAttribute("data-job-id"), {
      progress: function (job) {
        box.classList.remove("error");
        state.textContent = job.status + ", " + job.seconds.toFixed(1) + " s";
      },
      done: reload,
      failed: reload,
      lost: function (err) {
        box.classList.add("error");
        if (err.status === 404) {
          state.textContent = "no longer followed (" + err.message + "); reload to look again";
          return;
        }
        state.textContent = "not answered (" + err.message + "); trying again";
        window.setTimeout(follow, RETRY_MS);
      }
    });
  }

  follow();
})();
