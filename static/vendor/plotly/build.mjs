// Builds plotly-<version>-bar-heatmap-scatter.min.js: plotly.js with only the traces the dashboard
// draws (app/viz.py, app/audits/report.py), as plotly.js's own custom bundles are built (its
// esbuild-config.js: an IIFE that defines the global Plotly, minified, es2016).
//
//   npm pack plotly.js@4.1.1 && tar xzf plotly.js-4.1.1.tgz      # the source, as published
//   (cd package && npm install --omit=dev --ignore-scripts)      # its runtime dependencies
//   npm install esbuild@0.28.1                                   # plotly.js 4.1.1's bundler
//   node static/vendor/plotly/build.mjs package static/vendor/plotly
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const TRACES = ["bar", "heatmap", "scatter"];
const [source, outDir] = process.argv.slice(2).map((p) => resolve(p));
const version = JSON.parse(readFileSync(join(source, "package.json"), "utf8")).version;
const entry = join(source, "lib", "index-dashboard.js");
writeFileSync(entry, "'use strict';\nvar Plotly = require('./core');\nPlotly.register([" +
  TRACES.filter((t) => t !== "scatter").map((t) => `require('./${t}')`).join(", ") +
  "]);\nmodule.exports = Plotly;\n");
const outfile = join(outDir, `plotly-${version}-${TRACES.join("-")}.min.js`);
await build({
  entryPoints: [entry], outfile, format: "iife", globalName: "Plotly", bundle: true, minify: true,
  target: "es2016", define: { global: "window", "define.amd": "false" },  // legal comments kept at the end
  loader: { ".css": "empty" },  // only map traces load a style sheet (maplibre-gl's)
  banner: { js: `/**\n* plotly.js (${TRACES.join(", ")} - minified) v${version}\n* Copyright 2012-2026, ` +
    "Plotly, Inc.\n* All rights reserved.\n* Licensed under the MIT license\n*/" },
});
console.log(outfile);
