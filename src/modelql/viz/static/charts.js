/* modelql charts: heat map, grouped bars, histogram as inline SVG (no dependencies).
   Used by the web UI (served at /ui/charts.js) and inlined into the standalone HTML files
   the CLI writes (TRACE ... SAVE "x.html", modelql explain --html). */
(function (root) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(w, h, cls) {
    return el("svg", { width: w, height: h, viewBox: "0 0 " + w + " " + h, "class": cls || "chart", role: "img" });
  }

  /* value in [0,1] -> colour (white -> blue -> dark blue) */
  function colour(t) {
    t = Math.max(0, Math.min(1, t));
    var r = Math.round(247 - t * (247 - 8)), g = Math.round(251 - t * (251 - 48)), b = Math.round(255 - t * (255 - 107));
    return "rgb(" + r + "," + g + "," + b + ")";
  }

  function clip(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "…" : s; }

  /* opts: rows (labels, top to bottom), cols (labels), value(r, c) -> [0,1] or null,
     text(r, c) -> cell text, title(r, c) -> tooltip, cell: px */
  function heatmap(opts) {
    var cw = opts.cellWidth || 56, ch = opts.cellHeight || 18, left = opts.left || 48, top = opts.top || 70;
    var w = Math.max(left + cw * opts.cols.length + 10, left + 7 * (opts.caption || "").length), h = top + ch * opts.rows.length + 30;
    var s = svg(w, h, "chart heatmap");
    opts.cols.forEach(function (c, j) {
      var x = left + j * cw + cw / 2;
      s.appendChild(el("text", { x: x, y: top - 6, "text-anchor": "start", transform: "rotate(-40 " + x + " " + (top - 6) + ")",
                                 "class": "col-label" }, clip(JSON.stringify(c).slice(1, -1), 14)));
    });
    opts.rows.forEach(function (r, i) {
      var y = top + i * ch;
      s.appendChild(el("text", { x: left - 6, y: y + ch * 0.7, "text-anchor": "end", "class": "row-label" }, r));
      opts.cols.forEach(function (_c, j) {
        var v = opts.value(i, j);
        var g = el("g", { "class": "cell", "data-row": i, "data-col": j });
        var rect = el("rect", { x: left + j * cw, y: y, width: cw - 1, height: ch - 1,
                                fill: v === null || v === undefined ? "#eee" : colour(v) });
        var title = opts.title ? opts.title(i, j) : null;
        if (title) rect.appendChild(el("title", {}, title));
        g.appendChild(rect);
        var t = opts.text ? opts.text(i, j) : null;
        if (t !== null && t !== undefined && t !== "")
          g.appendChild(el("text", { x: left + j * cw + cw / 2, y: y + ch * 0.7, "text-anchor": "middle",
                                     fill: v > 0.55 ? "#fff" : "#111", "class": "cell-text" }, t));
        s.appendChild(g);
      });
    });
    if (opts.caption) s.appendChild(el("text", { x: left, y: h - 8, "class": "caption" }, opts.caption));
    return s;
  }

  /* opts: labels (x categories), series: [{name, values, colour}], caption */
  function bars(opts) {
    var n = opts.labels.length, k = opts.series.length;
    var bw = opts.barWidth || 8, gap = 6, left = 56, top = 24, ph = opts.height || 160;
    var w = Math.max(300, left + n * (k * bw + gap) + 20, left + 120 + 7 * (opts.caption || "").length), h = top + ph + 50;
    var s = svg(w, h, "chart bars");
    var lo = 0, hi = 0;
    opts.series.forEach(function (se) { se.values.forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    if (hi === lo) hi = lo + 1;
    function y(v) { return top + (hi - v) / (hi - lo) * ph; }
    s.appendChild(el("line", { x1: left, x2: w - 10, y1: y(0), y2: y(0), "class": "axis" }));
    [hi, 0, lo].forEach(function (v) {
      s.appendChild(el("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", "class": "row-label" }, v.toFixed(2)));
    });
    opts.labels.forEach(function (lab, i) {
      var x0 = left + 4 + i * (k * bw + gap);
      opts.series.forEach(function (se, j) {
        var v = se.values[i];
        if (v === null || v === undefined) return;
        var r = el("rect", { x: x0 + j * bw, y: Math.min(y(v), y(0)), width: bw - 1, height: Math.max(1, Math.abs(y(v) - y(0))),
                             fill: se.colour, "class": "bar bar-" + j });
        r.appendChild(el("title", {}, lab + " " + se.name + ": " + v.toFixed(3)));
        s.appendChild(r);
      });
      if (n <= 40 || i % 2 === 0)
        s.appendChild(el("text", { x: x0 + k * bw / 2, y: top + ph + 14, "text-anchor": "middle", "class": "col-label" }, lab));
    });
    var lx = left;
    opts.series.forEach(function (se) {
      s.appendChild(el("rect", { x: lx, y: h - 18, width: 10, height: 10, fill: se.colour }));
      s.appendChild(el("text", { x: lx + 14, y: h - 9, "class": "legend" }, se.name));
      lx += 20 + se.name.length * 7;
    });
    if (opts.caption) s.appendChild(el("text", { x: lx + 10, y: h - 9, "class": "caption" }, opts.caption));
    return s;
  }

  /* bins: [{low, high, count}] */
  function histogram(bins, opts) {
    opts = opts || {};
    var left = 40, top = 10, ph = 120, bw = Math.max(3, Math.floor(360 / Math.max(1, bins.length)));
    var w = left + bins.length * bw + 20, h = top + ph + 36;
    var s = svg(w, h, "chart histogram");
    var mx = 1;
    bins.forEach(function (b) { mx = Math.max(mx, b.count); });
    bins.forEach(function (b, i) {
      var bh = b.count ? Math.max(1, Math.log(1 + b.count) / Math.log(1 + mx) * ph) : 0;
      var r = el("rect", { x: left + i * bw, y: top + ph - bh, width: bw - 1, height: bh, fill: opts.colour || "#3b6fb6" });
      r.appendChild(el("title", {}, b.low.toFixed(3) + " … " + b.high.toFixed(3) + ": " + b.count));
      s.appendChild(r);
    });
    if (bins.length) {
      s.appendChild(el("text", { x: left, y: top + ph + 14, "class": "col-label" }, bins[0].low.toFixed(2)));
      s.appendChild(el("text", { x: left + bins.length * bw, y: top + ph + 14, "text-anchor": "end", "class": "col-label" },
                       bins[bins.length - 1].high.toFixed(2)));
    }
    s.appendChild(el("text", { x: left, y: h - 4, "class": "caption" }, opts.caption || "count (log scale)"));
    return s;
  }

  function layerName(l) { return l < 0 ? "emb" : "L" + l; }

  /* A TRACE (the JSON TRACE ... SAVE writes, or /v1/trace): layer x position heat map of the
     answer's probability (metric "prob") or rank ("rank"). */
  function traceHeatmap(tr, metric) {
    var layers = [], positions = [], cell = {};
    tr.rows.forEach(function (r) {
      if (layers.indexOf(r.layer) < 0) layers.push(r.layer);
      if (positions.indexOf(r.position) < 0) positions.push(r.position);
      cell[r.layer + ":" + r.position] = r;
    });
    layers.sort(function (a, b) { return b - a; });  /* last layer on top */
    positions.sort(function (a, b) { return a - b; });
    var rank = metric === "rank";
    return heatmap({
      rows: layers.map(layerName),
      cols: positions.map(function (p) { return tr.tokens[p]; }),
      value: function (i, j) {
        var r = cell[layers[i] + ":" + positions[j]];
        if (!r || r.answer_rank === null || r.answer_rank === undefined) return null;
        return rank ? 1 - Math.log(r.answer_rank) / Math.log(Math.max(2, tr.vocab_size || 50000)) : Math.sqrt(r.answer_prob);
      },
      text: function (i, j) {
        var r = cell[layers[i] + ":" + positions[j]];
        if (!r || r.answer_rank === null || r.answer_rank === undefined) return "";
        return rank ? String(r.answer_rank) : (100 * r.answer_prob).toFixed(r.answer_prob >= 0.1 ? 0 : 1);
      },
      title: function (i, j) {
        var r = cell[layers[i] + ":" + positions[j]];
        if (!r) return null;
        return layerName(r.layer) + " @ " + JSON.stringify(tr.tokens[r.position]) + ": rank " + r.answer_rank +
          ", p " + (r.answer_prob || 0).toFixed(4) + ", top-1 " + JSON.stringify(r.top_token) + " (" + r.top_prob.toFixed(3) + ")";
      },
      caption: (rank ? "rank" : "probability (%)") + " of " + JSON.stringify(tr.answer) + " by layer (rows) and position (columns)"
    });
  }

  /* attention vs FFN direct contributions to the answer's logit per layer, at `position`
     (default: the last). */
  function traceBars(tr, position) {
    var pos = position;
    if (pos === undefined || pos === null) pos = tr.tokens.length - 1;
    var rows = tr.rows.filter(function (r) { return r.position === pos && r.layer >= 0; });
    rows.sort(function (a, b) { return a.layer - b.layer; });
    return bars({
      labels: rows.map(function (r) { return layerName(r.layer); }),
      series: [{ name: "attention", colour: "#e07b39", values: rows.map(function (r) { return r.attn_logit; }) },
               { name: "FFN", colour: "#3b6fb6", values: rows.map(function (r) { return r.ffn_logit; }) }],
      caption: "logit-lens contribution to " + JSON.stringify(tr.answer) + " at position " + pos
    });
  }

  root.ModelqlCharts = { heatmap: heatmap, bars: bars, histogram: histogram, traceHeatmap: traceHeatmap,
                         traceBars: traceBars, layerName: layerName };
})(window);
