/* Draws an audit's figures (the permalink page and the self-contained HTML export): the figures
   are a JSON data block (#audit-figures, {item id: {data, layout}}), so no inline code runs and
   the page works under the server's Content-Security-Policy. */
(function () {
  "use strict";
  var block = document.getElementById("audit-figures");
  if (!block || typeof Plotly === "undefined") { return; }
  var figures = JSON.parse(block.textContent);
  Object.keys(figures).forEach(function (id) {
    var el = document.getElementById("plot-" + id);
    if (el) {
      Plotly.newPlot(el, figures[id].data, figures[id].layout, { displayModeBar: false, responsive: true });
    }
  });
})();
