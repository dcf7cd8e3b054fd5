/* influence dashboard: the test-point page's attack panel (Koh & Liang §5.2). The form POSTs
   {test_id, n_points, epsilon, iterations} to /api/v1/attacks (202: a job), follows the job
   (static/lib/jobs.js: progress, and a Cancel button while it runs) and shows the result:
   flipped or not, the prediction before and after retraining, the bound, and each perturbed
   training image as original | δ | perturbed. */
(function () {
  "use strict";

  var http = window.influence.http;  // static/lib/http.js: api() fetches JSON and says why it failed
  var dom = window.influence.dom;  // static/lib/dom.js
  var jobs = window.influence.jobs;  // static/lib/jobs.js: follows and cancels a job
  var el = dom.el;

  function pct(p) { return (100 * p).toFixed(1) + "%"; }

  function setUp(form) {
    var names = JSON.parse(form.getAttribute("data-class-names") || "[]");
    var panel = form.closest("section");
    var status = panel.querySelector(".attack-status");
    var bar = panel.querySelector("progress");
    var text = panel.querySelector(".attack-progress-text");
    var out = panel.querySelector(".attack-result");
    var button = form.querySelector("button[type=submit]");
    var stop = panel.querySelector("button.job-cancel");
    function cls(i) { return i in names ? names[i] : String(i); }

    function say(message, isError) {
      text.textContent = message;
      status.classList.toggle("error", !!isError);
    }

    function finish() { dom.busy(button, false); }

    function fact(term, value) { return [el("dt", { text: term }), el("dd", {}, [value])]; }

    function show(job) {
      var r = job.result;
      var label = r.label;
      var verdict = r.flipped
        ? el("p", { "class": "attack-verdict flipped" }, ["Flipped: after retraining the model predicts ",
            el("strong", { text: cls(r.predicted_after) }), " instead of " + cls(label) + "."])
        : el("p", { "class": "attack-verdict held" }, ["Not flipped: after " + dom.plural(r.iterations, "retraining") + " the model still predicts ", el("strong", { text: cls(r.predicted_after) }), "."]);
      var facts = el("dl", { "class": "facts attack-facts" });
      [fact("before", cls(r.predicted_before) + " (" + pct(r.proba_before[r.predicted_before]) + "), p(label " +
              cls(label) + ") " + pct(r.proba_before[label])),
       fact("after", cls(r.predicted_after) + " (" + pct(r.proba_after[r.predicted_after]) + "), p(label " +
              cls(label) + ") " + pct(r.proba_after[label])),
       fact("bound", "|δ| ≤ ε = " + r.epsilon + " per input value (largest used " + r.max_abs_delta.toPrecision(3) +
              "), step " + r.step.toPrecision(3)),
       fact("perturbed", dom.plural(r.train_ids.length, "training image") + ", " +
              dom.plural(r.iterations, "retraining") + ", " + job.seconds.toFixed(1) + " s"),
       fact("ground truth", r.ground_truth)
      ].forEach(function (pair) { pair.forEach(function (node) { facts.appendChild(node); }); });

      var list = el("ul", { "class": "attack-images" });
      r.images.forEach(function (im) {
        var id = im.train_id;
        function pic(src, what) {
          return el("img", { src: src, alt: what + " of training image #" + id, title: what, width: "56", height: "56" });
        }
        list.appendChild(el("li", {}, [
          el("span", { "class": "triptych" }, [pic(im.original, "original"), pic(im.delta, "δ"), pic(im.perturbed, "perturbed")]),
          el("a", { href: "/train-points/" + id, text: "#" + id })]));
      });
      out.replaceChildren(verdict, facts,
        el("p", { "class": "hint" }, ["Each training image: original | δ (grey = 0, lighter = brightened, darker = darkened) | perturbed."]),
        list);
      out.hidden = false;
    }

    function follow(job) {
      jobs.follow(job.id, {
        bar: bar, cancel: stop, say: say,
        progress: function (j) {
          var p = j.progress || {};
          say(j.status === "queued" ? "waiting for another job to finish…"
              : "retraining " + (p.total ? p.done + " of at most " + p.total : "…"));
        },
        done: function (j) {
          say("done in " + j.seconds.toFixed(1) + " s");
          show(j);
          finish();
        },
        failed: function (j) { say("The attack failed: " + j.error, true); finish(); },
        cancelled: function (j) {
          say("Cancelled after " + dom.plural(j.progress.done, "retraining") + "; nothing was kept.");
          finish();
        },
        lost: function (err) { say("Could not follow the attack: " + err.message, true); finish(); }
      });
    }

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var body = { test_id: parseInt(form.getAttribute("data-test-id"), 10) };
      ["n_points", "iterations"].forEach(function (k) { body[k] = parseInt(form.elements[k].value, 10); });
      body.epsilon = parseFloat(form.elements.epsilon.value);
      dom.busy(button, true);
      out.hidden = true;
      status.hidden = false;
      bar.removeAttribute("value");
      say("starting…");
      http.guardedApi("POST", "/api/v1/attacks", body).then(follow,
        function (err) { say("Could not start the attack: " + err.message, true); finish(); });
    });
  }

  document.querySelectorAll("form[data-attack]").forEach(setUp);
})();
