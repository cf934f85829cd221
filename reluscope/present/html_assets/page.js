// reluscope HTML report: unpack the inlined plotly.js, then draw the figures built from the JSON report(s).
(function () {
  "use strict";
  var status = document.getElementById("status");
  var page = JSON.parse(document.getElementById("reluscope-page").textContent);
  var started = performance.now();
  var drawn = {};
  var config = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

  function loadPlotly() {
    if (window.Plotly) return Promise.resolve();
    if (typeof DecompressionStream === "undefined") {
      return Promise.reject(new Error("this browser cannot unpack the inlined charts (no DecompressionStream); " +
        "open the report in a current Chrome, Edge, Firefox or Safari"));
    }
    var packed = atob(document.getElementById("plotly-gz").textContent.trim());
    var bytes = new Uint8Array(packed.length);
    for (var i = 0; i < packed.length; i++) bytes[i] = packed.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(function (source) {
      var script = document.createElement("script");
      script.textContent = source;
      document.head.appendChild(script);
      if (!window.Plotly) throw new Error("plotly.js did not load");
    });
  }

  // Unit strips carry one [site, first unit] per row; hover needs [site, unit] per cell.
  function expand(figure) {
    var meta = figure.meta || {};
    if (meta.kind !== "units" && meta.kind !== "transitions") return figure;
    var trace = figure.data[0];
    trace.customdata = trace.z.map(function (row, r) {
      var info = meta.rows[r];
      return row.map(function (value, c) {
        if (info[0] === null || value === null) return null;
        var cell = [info[0], info[1] + c];
        if (meta.kind === "transitions") cell.push(meta.states[value]);
        return cell;
      });
    });
    return figure;
  }

  function draw(div, figure) {
    var name = div.getAttribute("data-fig");
    if (!figure) {
      div.classList.add("empty");
      if (window.Plotly) Plotly.purge(div);
      drawn[name] = false;
      return Promise.resolve();
    }
    div.classList.remove("empty");
    figure = expand(JSON.parse(JSON.stringify(figure)));
    return Plotly.react(div, figure.data, figure.layout, config).then(function () { drawn[name] = true; });
  }

  function charts(section) { return document.querySelectorAll("#" + section + " .chart"); }

  function showReport(index) {
    document.querySelectorAll(".per-report").forEach(function (el) {
      el.hidden = Number(el.getAttribute("data-report")) !== index;
    });
    var figures = page.depth[index];
    return Promise.all(Array.prototype.map.call(charts("depth"), function (div) {
      return draw(div, figures[div.getAttribute("data-fig")]);
    }));
  }

  function showDiff(index) {
    document.querySelectorAll(".per-diff").forEach(function (el) {
      el.hidden = Number(el.getAttribute("data-diff")) !== index;
    });
    var figures = page.diffs[index];
    return Promise.all(Array.prototype.map.call(charts("diff"), function (div) {
      return draw(div, figures[div.getAttribute("data-fig")]);
    }));
  }

  function fail(error) {
    console.error("reluscope report: " + (error && error.message ? error.message : error));
    status.textContent = "Charts could not be drawn: " + (error && error.message ? error.message : error) +
      ". The tables below have every number.";
    status.className = "status error";
    window.__reluscope = { ready: true, error: String(error), ms: performance.now() - started, drawn: drawn };
  }

  loadPlotly().then(function () {
    var jobs = [showReport(page.shown)];
    if (page.sequence) {
      jobs.push(Promise.all(Array.prototype.map.call(charts("sequence"), function (div) {
        return draw(div, page.sequence[div.getAttribute("data-fig")]);
      })));
    }
    if (page.diffs.length) jobs.push(showDiff(0));
    return Promise.all(jobs);
  }).then(function () {
    var select = document.getElementById("report-select");
    if (select) select.addEventListener("change", function () { showReport(Number(select.value)); });
    var pair = document.getElementById("diff-select");
    if (pair) pair.addEventListener("change", function () { showDiff(Number(pair.value)); });
    status.className = "status done";
    window.__reluscope = { ready: true, error: null, ms: performance.now() - started, drawn: drawn };
  }).catch(fail);
})();
