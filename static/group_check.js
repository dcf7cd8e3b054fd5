/* influence dashboard, groups page: follow the retraining check's background job
   (static/lib/jobs.js) and reload the page when it ends; the page then shows the answer or the
   error. The box is #check-job, with data-job-id; its [data-job-state] says how the job is going. */
(function () {
  "use strict";

  var box = document.getElementById("check-job");
  if (!box) { return; }
  var state = box.querySelector("[data-job-state]");

  function reload() { window.location.reload(); }

  window.influence.jobs.follow(box.getAttribute("data-job-id"), {
    progress: function (job) { state.textContent = job.status + ", " + job.seconds.toFixed(1) + " s"; },
    done: reload,
    failed: reload,
    lost: function (err) {
      state.textContent = "no longer followed (" + err.message + "); reload to look again";
      box.classList.add("error");
    }
  });
})();
