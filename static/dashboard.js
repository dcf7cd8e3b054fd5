/* influence dashboard: draw the server-built Plotly figures, run the upload drop zone, and show
   only the group form's fields for the chosen selection. */
(function () {
  "use strict";

  var PLOT_CONFIG = { displaylogo: false, responsive: true,
                      modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };

  /* Each element with data-figure holds a figure dict ({data, layout}) built in app/viz.py.
     A clicked point whose customdata is a site path ("/...") opens that page. */
  function drawFigures() {
    if (typeof Plotly === "undefined") { return; }
    document.querySelectorAll("[data-figure]").forEach(function (el) {
      var fig = JSON.parse(el.getAttribute("data-figure"));
      Plotly.newPlot(el, fig.data, fig.layout, PLOT_CONFIG).then(function () {
        el.classList.add("drawn");
      });
      el.on("plotly_click", function (event) {
        var point = event.points && event.points[0];
        var target = point && point.customdata;
        if (typeof target === "string" && target.charAt(0) === "/") {
          window.location.href = target;
        }
      });
    });
  }

  /* The drop zone is a <label> around the file input: clicking opens the picker; dropping a
     file (or choosing one) puts it in the input and submits the form. */
  function setUpDropZone() {
    var zone = document.getElementById("dropzone");
    var input = document.getElementById("upload-file");
    var form = document.getElementById("upload-form");
    var status = document.getElementById("upload-status");
    if (!zone || !input || !form) { return; }

    function submit() {
      if (!input.files || input.files.length === 0) { return; }
      zone.classList.add("busy");
      if (status) { status.textContent = "Explaining " + input.files[0].name + "…"; }
      form.submit();
    }
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.add("over"); });
    });
    ["dragleave", "dragend"].forEach(function (name) {
      zone.addEventListener(name, function () { zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (e) {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer && e.dataTransfer.files.length > 0) {
        input.files = e.dataTransfer.files;
        submit();
      }
    });
    input.addEventListener("change", submit);
  }

  /* The group page's form: fields in a [data-by] wrapper belong to the selections it names; the
     others are hidden and disabled (so the URL carries only what the view uses). A link with
     data-busy says so while its slow page loads. */
  function setUpGroupForm() {
    var form = document.getElementById("group-form");
    if (form) {
      var by = form.elements.by;
      var sync = function () {
        form.querySelectorAll("[data-by]").forEach(function (wrapper) {
          var on = wrapper.getAttribute("data-by").split(" ").indexOf(by.value) >= 0;
          wrapper.hidden = !on;
          wrapper.querySelectorAll("input, select").forEach(function (field) { field.disabled = !on; });
        });
      };
      by.addEventListener("change", sync);
      sync();
      window.addEventListener("pageshow", function () {  // back from the result: fields usable again
        form.querySelectorAll("input").forEach(function (field) { field.disabled = false; });
        sync();
      });
      form.addEventListener("submit", function () {  // blank fields stay out of the URL
        form.querySelectorAll("input").forEach(function (field) {
          if (field.value.trim() === "") { field.disabled = true; }
        });
      });
    }
    document.querySelectorAll("a[data-busy]").forEach(function (link) {
      link.addEventListener("click", function () {
        link.textContent = link.getAttribute("data-busy");
        link.classList.add("busy");
      });
    });
  }

  drawFigures();
  setUpDropZone();
  setUpGroupForm();
})();
