/* influence dashboard: draw the server-built Plotly figures (the confusion matrix's cells also
   by keyboard), run the upload drop zone, and show only the group form's fields for the chosen
   selection. */
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
        addCellKeys(el, fig);
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

  function axisTitle(axis, fallback) {
    var t = axis && axis.title;
    return (t && typeof t === "object" ? t.text : t) || fallback;
  }

  /* A heatmap whose cells link to pages (customdata "/..."), such as the confusion matrix, gets a
     grid of links over its cells for the keyboard: one tab stop; the arrow keys, Home and End move
     between cells; Enter or Space opens a cell's page as a click does; the focused cell is outlined
     and shows its hover label. The links let the mouse through to Plotly (pointer-events: none). */
  function addCellKeys(el, fig) {
    var trace = fig.data[0];
    if (!trace || trace.type !== "heatmap" || !Array.isArray(trace.customdata)) { return; }
    var rows = trace.z.length;
    var cols = rows ? trace.z[0].length : 0;
    var xTitle = axisTitle(fig.layout.xaxis, "x");
    var yTitle = axisTitle(fig.layout.yaxis, "y");
    var layer = document.createElement("div");
    layer.className = "plot-keys";
    var cells = trace.z.map(function (row, i) {
      return row.map(function (value, j) {
        var a = document.createElement("a");
        a.href = trace.customdata[i][j];
        a.tabIndex = i === 0 && j === 0 ? 0 : -1;
        a.setAttribute("aria-label", yTitle + " " + trace.y[i] + ", " + xTitle + " " + trace.x[j] + ": " + value);
        a.addEventListener("focus", function () {
          cells.forEach(function (r) { r.forEach(function (c) { c.tabIndex = c === a ? 0 : -1; }); });
          try { Plotly.Fx.hover(el, { xval: j, yval: i }); } catch (e) { /* no hover label: the outline stays */ }
        });
        a.addEventListener("blur", function () { try { Plotly.Fx.unhover(el); } catch (e) { /* nothing shown */ } });
        layer.appendChild(a);
        return a;
      });
    });
    function place() {
      var xa = el._fullLayout.xaxis;
      var ya = el._fullLayout.yaxis;
      var w = xa._length / cols;
      var h = ya._length / rows;
      cells.forEach(function (row, i) {
        row.forEach(function (a, j) {
          a.style.left = (xa._offset + xa.l2p(j) - w / 2) + "px";
          a.style.top = (ya._offset + ya.l2p(i) - h / 2) + "px";
          a.style.width = w + "px";
          a.style.height = h + "px";
        });
      });
    }
    layer.addEventListener("keydown", function (e) {
      var i = parseInt(e.target.dataset.row, 10);
      var j = parseInt(e.target.dataset.col, 10);
      var moves = { ArrowUp: [i - 1, j], ArrowDown: [i + 1, j], ArrowLeft: [i, j - 1], ArrowRight: [i, j + 1],
                    Home: [i, 0], End: [i, cols - 1] };
      if (e.key === " ") {
        e.preventDefault();
        e.target.click();
      } else if (moves[e.key]) {
        e.preventDefault();
        var to = moves[e.key];
        cells[Math.min(rows - 1, Math.max(0, to[0]))][Math.min(cols - 1, Math.max(0, to[1]))].focus();
      }
    });
    cells.forEach(function (row, i) { row.forEach(function (a, j) { a.dataset.row = i; a.dataset.col = j; }); });
    el.setAttribute("role", "group");  // no longer a plain image: it holds focusable cells
    el.setAttribute("aria-label", el.getAttribute("aria-label") + " (arrow keys move between cells, Enter opens one)");
    el.appendChild(layer);
    place();
    el.on("plotly_afterplot", place);
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
