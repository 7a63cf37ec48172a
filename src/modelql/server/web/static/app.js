/* modelql web UI: vanilla JS over the server's JSON API (same origin, bearer key). */
(function () {
  "use strict";
  var C = window.ModelqlCharts;
  var KEY = "modelql-api-key";
  var MODEL = "modelql-model";
  /* base: the served model's API prefix — "/v1" with one model, "/v1/{id}" in multi-model mode, where the
     knowledge routes live under the model's id and the OpenAI routes pick the model by the body's `model` */
  var state = { key: sessionStorage.getItem(KEY) || "", model: null, base: "/v1", models: [], messages: [], prompts: [], entity: null };
  var SHARED = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"];
  function url(path) {
    var bare = path.split("?")[0];
    if (state.base === "/v1" || path.slice(0, 4) !== "/v1/" || SHARED.indexOf(bare) >= 0) return path;
    return state.base + path.slice(3);
  }

  function $(id) { return document.getElementById(id); }
  function h(tag, attrs) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
      else if (attrs[k] !== null && attrs[k] !== undefined) e.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return e;
  }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }
  function fmt(x, d) { return x === null || x === undefined ? "" : Number(x).toFixed(d === undefined ? 3 : d); }
  function status(text, isError) { var s = $("status"); s.textContent = text || ""; s.className = isError ? "error" : "muted"; }
  function remember(p) { if (p && state.prompts.indexOf(p) < 0) { state.prompts.unshift(p); state.prompts = state.prompts.slice(0, 12); } }

  function headers(json) {
    var hd = {};
    if (json) hd["Content-Type"] = "application/json";
    if (state.key) hd["Authorization"] = "Bearer " + state.key;
    return hd;
  }
  function ApiError(status, message) { this.status = status; this.message = message; }
  async function api(method, path, body) {
    var t0 = performance.now();
    var r = await fetch(url(path), { method: method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
    var data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      var msg = data && (typeof data.error === "string" ? data.error : data.error && data.error.message) || (r.status + " " + r.statusText);
      if (r.status === 401) showKey(state.key ? "the key was not accepted: " + msg : "this server needs its API key");
      throw new ApiError(r.status, msg);
    }
    status(method + " " + path.split("?")[0] + " · " + Math.round(performance.now() - t0) + " ms");
    return data;
  }
  function fail(where) { return function (e) { clear(where).appendChild(h("p", { cls: "error", text: e.message || String(e) })); status(e.message || String(e), true); }; }

  /* -- key + tabs ---------------------------------------------------------------------------- */
  function showKey(msg) { $("key-panel").hidden = false; $("app").hidden = true; $("key-error").textContent = msg || ""; }
  async function connect() {
    try {
      var m = await api("GET", "/v1/models");
      state.models = m.data;
      var sel = clear($("model-select"));
      m.data.forEach(function (c) { sel.appendChild(h("option", { value: c.id, text: c.id })); });
      var saved = sessionStorage.getItem(MODEL);
      selectModel(m.data.some(function (c) { return c.id === saved; }) ? saved : m.data[0].id);
      sel.hidden = m.data.length < 2;
      $("model-id").hidden = m.data.length > 1;
      $("key-panel").hidden = true; $("app").hidden = false;
      document.body.setAttribute("data-ready", "1");
    } catch (e) { if (e.status !== 401) showKey(e.message); }
  }
  /* pick the model every view works against: a different model is a different conversation, vindex and
     patch session, so what was shown for the previous one is cleared */
  function selectModel(id) {
    var card = state.models.filter(function (c) { return c.id === id; })[0];
    if (!card) return;
    var changed = state.model !== null && state.model !== id;
    state.model = id;
    state.base = card.path || "/v1";
    sessionStorage.setItem(MODEL, id);
    $("model-select").value = id;
    $("model-id").textContent = id;
    document.body.setAttribute("data-model", id);
    if (changed) {
      state.messages = []; state.entity = null; lastTrace = null;
      ["chat-log", "browse-out", "trace-out", "insert-out", "entity-list", "side-body"].forEach(function (e) { clear($(e)); });
      $("lql-out").textContent = ""; $("side").hidden = true;
      status("model " + id + (state.models.length > 1 ? " · its knowledge routes are under " + state.base + "/" : ""));
      if (!$("tab-patches").hidden) refreshPatches();
    }
  }
  $("model-select").addEventListener("change", function () { selectModel($("model-select").value); });
  $("key-form").addEventListener("submit", function (ev) {
    ev.preventDefault(); state.key = $("key-input").value.trim(); sessionStorage.setItem(KEY, state.key); connect();
  });
  document.querySelectorAll("#tabs button").forEach(function (b) {
    b.addEventListener("click", function () { showTab(b.getAttribute("data-tab")); });
  });
  function showTab(name) {
    document.querySelectorAll("#tabs button").forEach(function (b) { b.classList.toggle("active", b.getAttribute("data-tab") === name); });
    document.querySelectorAll("section.tab").forEach(function (s) { s.hidden = s.id !== "tab-" + name; });
    if (name === "patches") refreshPatches();
  }
  $("side-close").addEventListener("click", function () { $("side").hidden = true; });
  function side() { $("side").hidden = false; return clear($("side-body")); }

  /* -- chat ------------------------------------------------------------------------------------- */
  function addMessage(role, text) {
    var body = h("span", { cls: "body" });
    var m = h("div", { cls: "msg " + role }, h("span", { cls: "who", text: role === "user" ? "you" : "model" }), body);
    if (text) body.textContent = text;
    $("chat-log").appendChild(m);
    return body;
  }
  $("chat-clear").addEventListener("click", function () { state.messages = []; clear($("chat-log")); });
  $("chat-input").addEventListener("keydown", function (ev) { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); } });
  $("chat-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    var text = $("chat-input").value.trim();
    if (!text) return;
    $("chat-input").value = "";
    remember(text);
    state.messages.push({ role: "user", content: text });
    addMessage("user", text);
    var body = addMessage("assistant", "");
    var history = state.messages.slice();
    var reply = { text: "", history: history, done: false };
    $("chat-send").disabled = true;
    try {
      var r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify({
        model: state.model, messages: history, stream: true, temperature: 0, max_tokens: Number($("chat-max").value) || 48 }) });
      if (!r.ok) { var d = await r.json().catch(function () { return {}; }); throw new Error((d.error && (d.error.message || d.error)) || r.status); }
      var reader = r.body.getReader(), dec = new TextDecoder(), buf = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buf += dec.decode(chunk.value, { stream: true });
        var lines = buf.split("\n");
        buf = lines.pop();
        lines.forEach(function (line) {
          if (line.slice(0, 6) !== "data: ") return;
          var payload = line.slice(6).trim();
          if (payload === "[DONE]") { reply.done = true; return; }
          var obj = JSON.parse(payload);
          if (obj.error) throw new Error(obj.error.message || obj.error);
          (obj.choices || []).forEach(function (ch) {
            var piece = ch.delta && ch.delta.content;
            if (!piece) return;
            var span = h("span", { cls: "tok", "data-offset": reply.text.length, text: piece });
            span.addEventListener("click", function () { explainToken(reply, span); });
            body.appendChild(span);
            reply.text += piece;
            $("chat-log").scrollTop = $("chat-log").scrollHeight;
          });
        });
      }
      state.messages.push({ role: "assistant", content: reply.text });
      body.parentNode.setAttribute("data-done", "1");
    } catch (e) {
      body.appendChild(h("span", { cls: "error", text: " [" + (e.message || e) + "]" }));
    } finally { $("chat-send").disabled = false; }
  });

  async function explainToken(reply, span) {
    document.querySelectorAll(".tok.selected").forEach(function (s) { s.classList.remove("selected"); });
    span.classList.add("selected");
    var box = side();
    box.appendChild(h("p", { cls: "muted", text: "explaining " + JSON.stringify(span.textContent) + " …" }));
    try {
      var d = await api("POST", "/v1/explain", { messages: reply.history, completion: reply.text,
                                                 offset: Number(span.getAttribute("data-offset")), top: 8 });
      renderExplanation(clear(box), d);
    } catch (e) { fail(box)(e); }
  }

  function featureLink(layer, feature) {
    return h("button", { cls: "link feature-link", "data-layer": layer, "data-feature": feature, text: "L" + layer + " F" + feature,
                         onclick: function () { openFeature(layer, feature); } });
  }

  function renderExplanation(box, d) {
    var t = d.tokens[d.index];
    box.setAttribute("data-token", t.token);
    box.appendChild(h("h2", { id: "explain-title", text: "Why " + JSON.stringify(t.token) + " (token " + (d.index + 1) + " of " + d.tokens.length + ")" }));
    box.appendChild(h("p", { cls: "muted", text: "predicted at position " + t.position + "; features that fired most (gate score g·x at that position)" }));
    var tb = h("table", { id: "explain-features" }, h("tr", {}, h("th", { text: "feature" }), h("th", { text: "gate" }),
      h("th", { text: "promotes" }), h("th", { text: "relation" })));
    t.features.forEach(function (f) {
      tb.appendChild(h("tr", {}, h("td", {}, featureLink(f.layer, f.feature)), h("td", { cls: "num", text: fmt(f.gate_score, 2) }),
        h("td", { text: f.top_tokens.slice(0, 4).join(", ") }), h("td", { text: f.relation || "" })));
    });
    box.appendChild(tb);
    if (d.writers && d.writers.length) {
      box.appendChild(h("h3", { text: "Features writing its logit" }));
      var wt = h("table", { id: "explain-writers" }, h("tr", {}, h("th", { text: "feature" }), h("th", { text: "logit +" }),
        h("th", { text: "activation" }), h("th", { text: "promotes" }), h("th", { text: "relation" })));
      d.writers.forEach(function (f) {
        wt.appendChild(h("tr", {}, h("td", {}, featureLink(f.layer, f.feature)), h("td", { cls: "num", text: fmt(f.contribution, 3) }),
          h("td", { cls: "num", text: fmt(f.activation, 3) }), h("td", { text: f.top_tokens.join(", ") }), h("td", { text: f.relation || "" })));
      });
      box.appendChild(wt);
    }
    if (d.layers) {
      var rows = d.layers.filter(function (r) { return r.layer >= 0; });
      var attn = 0, ffn = 0;
      rows.forEach(function (r) { attn += Math.abs(r.attn_logit || 0); ffn += Math.abs(r.ffn_logit || 0); });
      box.appendChild(h("h3", { text: "Attention vs FFN, per layer" }));
      box.appendChild(h("p", { text: "attention share of the direct contributions: " + (attn + ffn > 0 ? (100 * attn / (attn + ffn)).toFixed(0) : "0") + "%" }));
      box.appendChild(h("div", { cls: "scroll" }, C.bars({ labels: rows.map(function (r) { return C.layerName(r.layer); }),
        series: [{ name: "attention", colour: "#e07b39", values: rows.map(function (r) { return r.attn_logit; }) },
                 { name: "FFN", colour: "#3b6fb6", values: rows.map(function (r) { return r.ffn_logit; }) }],
        caption: "logit-lens contribution to " + JSON.stringify(t.token) })));
      var last = rows[rows.length - 1];
      if (last) box.appendChild(h("p", { cls: "muted", text: "rank after the last layer: " + last.rank + ", probability " + fmt(last.probability, 4) }));
    }
  }

  /* -- feature page ------------------------------------------------------------------------------ */
  async function openFeature(layer, feature) {
    var box = side();
    box.appendChild(h("p", { cls: "muted", text: "loading L" + layer + " F" + feature + " …" }));
    var q = "/v1/feature?layer=" + layer + "&feature=" + feature;
    state.prompts.forEach(function (p) { q += "&prompt=" + encodeURIComponent(p); });
    if (state.entity) q += "&entity=" + encodeURIComponent(state.entity);
    try {
      var d = await api("GET", q);
      clear(box);
      box.appendChild(h("h2", { id: "feature-title", text: "Feature L" + d.layer + " F" + d.feature }));
      box.appendChild(h("p", {}, h("span", { cls: "pill", text: "band " + (d.band || "?") }),
        h("span", { cls: "pill", text: "label " + (d.label ? d.label + " (" + d.label_source + ")" : "none") }),
        h("span", { cls: "pill", text: "c " + fmt(d.c_score, 3) })));
      box.appendChild(h("h3", { text: "Promotes (down vector's top tokens)" }));
      var tt = h("table", {}, h("tr", {}, h("th", { text: "token" }), h("th", { text: "logit" })));
      d.top_tokens.forEach(function (t) { tt.appendChild(h("tr", {}, h("td", { text: t.token }), h("td", { cls: "num", text: fmt(t.logit, 3) }))); });
      box.appendChild(tt);
      box.appendChild(h("h3", { text: "Gate score over the vocabulary (g · s·E[t])" }));
      box.appendChild(C.histogram(d.gate_histogram));
      box.appendChild(h("p", { cls: "muted", text: "strongest inputs: " + d.top_inputs.map(function (t) { return t.token + " " + fmt(t.gate_score, 2); }).join(", ") }));
      box.appendChild(h("h3", { text: "Prompts that fire it" }));
      if (!d.prompts.length) box.appendChild(h("p", { cls: "muted", text: "prompts you use in chat, walk and trace (and the relation templates of the entity you described) are scored here" }));
      else {
        var pt = h("table", {}, h("tr", {}, h("th", { text: "prompt" }), h("th", { text: "gate" }), h("th", { text: "z" }), h("th", { text: "rank" })));
        d.prompts.forEach(function (p) { pt.appendChild(h("tr", {}, h("td", { text: p.prompt }), h("td", { cls: "num", text: fmt(p.gate_score, 3) }),
          h("td", { cls: "num", text: fmt(p.z, 1) }), h("td", { cls: "num", text: p.rank }))); });
        box.appendChild(pt);
      }
    } catch (e) { fail(box)(e); }
  }

  /* -- browse ----------------------------------------------------------------------------------- */
  var completeTimer = null;
  $("entity-input").addEventListener("input", function () {
    clearTimeout(completeTimer);
    var v = $("entity-input").value;
    completeTimer = setTimeout(async function () {
      try {
        var d = await api("GET", "/v1/entities/complete?limit=20&prefix=" + encodeURIComponent(v));
        var dl = clear($("entity-list"));
        d.entities.forEach(function (e) { dl.appendChild(h("option", { value: e })); });
      } catch (e) { /* completion is best effort */ }
    }, 120);
  });
  $("describe-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    var entity = $("entity-input").value.trim(), out = $("browse-out");
    if (!entity) return;
    clearTimeout(completeTimer);  // the name is typed: no completion request competing with the query
    var t0 = performance.now();
    state.entity = entity;
    out.removeAttribute("data-view-ms");
    clear(out).appendChild(h("p", { cls: "muted", text: "DESCRIBE " + JSON.stringify(entity) + " …" }));
    try {
      var d = await api("GET", "/v1/describe/rows?entity=" + encodeURIComponent(entity) + "&band=" + $("describe-band").value +
                           "&mode=" + $("describe-mode").value);
      renderDescribe(clear(out), d);
      // what the person waited: submit → the edges painted (the frame after the DOM change)
      requestAnimationFrame(function () { setTimeout(function () { out.setAttribute("data-view-ms", Math.round(performance.now() - t0)); }, 0); });
    } catch (e) { fail(out)(e); }
  });
  function renderDescribe(out, d) {
    out.appendChild(h("h2", { text: d.entity + " — " + d.edges.length + " edges (" + d.mode + " mode, " + fmt(d.latency_ms, 0) + " ms)" }));
    if (!d.edges.length) { out.appendChild(h("p", { cls: "muted", text: d.found === false ? "unknown entity: nothing fires above the threshold" : "no edges" })); return; }
    var bands = {};
    d.edges.forEach(function (e) { (bands[e.band] = bands[e.band] || []).push(e); });
    ["syntax", "knowledge", "output"].concat(Object.keys(bands)).filter(function (b, i, a) { return bands[b] && a.indexOf(b) === i; }).forEach(function (b) {
      var sec = h("div", { cls: "band", "data-band": b }, h("h3", { text: b + " (" + bands[b].length + ")" }));
      var groups = {}, order = [];
      bands[b].forEach(function (e) { var r = e.relation || "(unlabelled)"; if (!groups[r]) { groups[r] = []; order.push(r); } groups[r].push(e); });
      order.sort(function (a, c) { return (a === "(unlabelled)") - (c === "(unlabelled)"); });
      order.forEach(function (r) {
        var ul = h("ul");
        groups[r].forEach(function (e) {
          ul.appendChild(h("li", { cls: "edge", "data-target": e.target }, h("b", { text: e.target }),
            h("span", { cls: "score", text: fmt(e.gate, 2) + " · " }), featureLink(e.layer, e.feature),
            e.layers && e.layers.length > 1 ? h("span", { cls: "score", text: " L" + Math.min.apply(null, e.layers) + "–" + Math.max.apply(null, e.layers) }) : null));
        });
        sec.appendChild(h("div", { cls: "relation", "data-relation": r }, h("h4", { text: r + (groups[r][0].source ? " · " + groups[r][0].source : "") }), ul));
      });
      out.appendChild(sec);
    });
  }
  $("walk-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    var p = $("walk-input").value.trim(), out = $("browse-out");
    if (!p) return;
    remember(p);
    try {
      var d = await api("GET", "/v1/walk?prompt=" + encodeURIComponent(p) + "&top=" + ($("walk-top").value || 5));
      clear(out).appendChild(h("h2", { text: "WALK " + JSON.stringify(d.prompt) + " (" + fmt(d.latency_ms, 0) + " ms)" }));
      var t = h("table", {}, h("tr", {}, h("th", { text: "layer" }), h("th", { text: "feature" }), h("th", { text: "gate" }), h("th", { text: "target" }), h("th", { text: "relation" })));
      d.hits.forEach(function (x) { t.appendChild(h("tr", {}, h("td", { cls: "num", text: x.layer }), h("td", {}, featureLink(x.layer, x.feature)),
        h("td", { cls: "num", text: fmt(x.gate_score, 1) }), h("td", { text: x.target }), h("td", { text: x.relation || "" }))); });
      out.appendChild(t);
    } catch (e) { fail(out)(e); }
  });
  $("select-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    var out = $("browse-out"), body = { limit: Number($("select-limit").value) || 20 };
    if ($("select-entity").value.trim()) body.entity = $("select-entity").value.trim();
    if ($("select-relation").value.trim()) body.relation = $("select-relation").value.trim();
    if ($("select-layer").value !== "") body.layer = Number($("select-layer").value);
    try {
      var d = await api("POST", "/v1/select", body);
      clear(out).appendChild(h("h2", { text: "SELECT: " + d.edges.length + " of " + d.total + " edges" }));
      var t = h("table", {}, h("tr", {}, h("th", { text: "feature" }), h("th", { text: "target" }), h("th", { text: "relation" }), h("th", { text: "c" }), h("th", { text: "top tokens" })));
      d.edges.forEach(function (x) { t.appendChild(h("tr", {}, h("td", {}, featureLink(x.layer, x.feature)), h("td", { text: x.target }),
        h("td", { text: x.relation || "" }), h("td", { cls: "num", text: fmt(x.c_score, 3) }), h("td", { text: (x.top_tokens || []).join(", ") }))); });
      out.appendChild(t);
    } catch (e) { fail(out)(e); }
  });

  /* -- trace ------------------------------------------------------------------------------------- */
  var lastTrace = null;
  $("trace-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    var p = $("trace-prompt").value.trim(), out = $("trace-out");
    if (!p) return;
    remember(p);
    var body = { prompt: p, positions: "all" };
    if ($("trace-answer").value.trim()) body.answer = $("trace-answer").value.trim();
    clear(out).appendChild(h("p", { cls: "muted", text: "TRACE …" }));
    try { lastTrace = await api("POST", "/v1/trace", body); drawTrace(); } catch (e) { fail(out)(e); }
  });
  $("trace-metric").addEventListener("change", function () { if (lastTrace) drawTrace(); });
  function drawTrace() {
    var tr = lastTrace, out = clear($("trace-out"));
    var first = null;
    tr.rows.forEach(function (r) { if (first === null && r.position === tr.tokens.length - 1 && r.answer_rank === 1) first = r.layer; });
    out.appendChild(h("h2", { text: "TRACE " + JSON.stringify(tr.prompt) + " for " + JSON.stringify(tr.answer) +
      (first === null ? " (never rank 1)" : " (rank 1 from " + C.layerName(first) + ")") }));
    out.appendChild(h("div", { cls: "scroll", id: "trace-heatmap" }, C.traceHeatmap(tr, $("trace-metric").value)));
    out.appendChild(h("h3", { text: "Attention vs FFN contributions per layer (last position)" }));
    out.appendChild(h("div", { cls: "scroll", id: "trace-bars" }, C.traceBars(tr)));
  }

  /* -- patches ----------------------------------------------------------------------------------- */
  async function refreshPatches() {
    var act = $("patch-active"), files = $("patch-files");
    try {
      var d = await api("GET", "/v1/patches");
      clear(act);
      if (!d.patches.length) act.appendChild(h("p", { cls: "muted", text: "no patches applied" }));
      else {
        var t = h("table", { id: "active-patches" }, h("tr", {}, h("th", { text: "name" }), h("th", { text: "operations" }), h("th")));
        d.patches.forEach(function (p) {
          t.appendChild(h("tr", { "data-patch": p.name }, h("td", { text: p.name }), h("td", { cls: "num", text: p.operations }),
            h("td", {}, h("button", { cls: "small", text: "remove", onclick: function () { removePatch(p.name); } }))));
        });
        act.appendChild(t);
      }
    } catch (e) { fail(act)(e); }
    try {
      var f = await api("GET", "/v1/patch-files");
      clear(files);
      if (!f.files.length) files.appendChild(h("p", { cls: "muted", text: "no .vlp files in the server's patch directory" }));
      var t2 = h("table", { id: "patch-file-list" });
      f.files.forEach(function (p) {
        t2.appendChild(h("tr", { "data-file": p.name }, h("td", { text: p.name }), h("td", { cls: "num", text: p.bytes + " B" }),
          h("td", {}, h("button", { cls: "small", text: "apply", onclick: function () { applyPatch(p.name); } }))));
      });
      files.appendChild(t2);
    } catch (e) { fail(files)(e); }
  }
  async function applyPatch(name) {
    try { await api("POST", "/v1/patch-files/apply", { name: name }); } catch (e) { status(e.message, true); }
    refreshPatches();
  }
  async function removePatch(name) {
    try { await api("DELETE", "/v1/patches/" + encodeURIComponent(name)); } catch (e) { status(e.message, true); }
    refreshPatches();
  }
  function predictions(title, d) {
    var preds = d.predictions || d.walk || [];
    var t = h("table", {}, h("tr", {}, h("th", { text: title, colspan: 2 })));
    preds.forEach(function (p) { t.appendChild(h("tr", {}, h("td", { text: p.token }), h("td", { cls: "num", text: (100 * p.probability).toFixed(1) + "%" }))); });
    if (d.knn_override) t.appendChild(h("tr", {}, h("td", { colspan: 2, text: "KNN override → " + d.knn_override.token + " (cos " + fmt(d.knn_override.cosine, 3) + ")" })));
    return t;
  }
  $("insert-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    var out = $("insert-out"), e = $("insert-entity").value.trim(), r = $("insert-relation").value.trim(), t = $("insert-target").value.trim();
    if (!e || !r || !t) { clear(out).appendChild(h("p", { cls: "error", text: "entity, relation and target are required" })); return; }
    var prompt = $("insert-prompt").value.trim() || ("The " + r.replace(/_/g, " ") + " of " + e + " is");
    clear(out).appendChild(h("p", { cls: "muted", text: "INFER before, INSERT, INFER after …" }));
    try {
      var before = await api("POST", "/v1/infer", { prompt: prompt, top: 5 });
      var ins = await api("POST", "/v1/insert", { entity: e, relation: r, target: t, mode: $("insert-mode").value });
      var after = await api("POST", "/v1/infer", { prompt: prompt, top: 5 });
      clear(out).appendChild(h("p", { text: "INSERT (" + e + ", " + r + ", " + t + ") at layer " + ins.layer + " · " + ins.mode + " · " + fmt(ins.latency_ms, 0) + " ms" }));
      out.appendChild(h("div", { cls: "row", id: "insert-compare" }, predictions("before: " + prompt, before), predictions("after", after)));
      refreshPatches();
    } catch (er) { fail(out)(er); }
  });

  /* -- LQL console -------------------------------------------------------------------------------- */
  var comp = { items: [], active: 0 };
  async function complete() {
    var ta = $("lql-input");
    try {
      var d = await api("POST", "/v1/lql/complete", { text: ta.value, cursor: ta.selectionStart, limit: 30 });
      comp.items = d.completions; comp.active = 0;
      if (comp.items.length === 1) return accept(0);
      drawCompletions();
    } catch (e) { status(e.message, true); }
  }
  function drawCompletions() {
    var ul = clear($("lql-completions"));
    ul.hidden = !comp.items.length;
    comp.items.forEach(function (c, i) {
      ul.appendChild(h("li", { cls: i === comp.active ? "active" : "", text: c.display || c.text, onmousedown: function (ev) { ev.preventDefault(); accept(i); } }));
    });
  }
  function accept(i) {
    var c = comp.items[i], ta = $("lql-input"), pos = ta.selectionStart;
    ta.value = ta.value.slice(0, c.start) + c.text + ta.value.slice(pos);
    ta.selectionStart = ta.selectionEnd = c.start + c.text.length;
    comp.items = []; drawCompletions(); ta.focus();
  }
  $("lql-input").addEventListener("keydown", function (ev) {
    var open = comp.items.length > 0;
    if (ev.key === "Tab") { ev.preventDefault(); if (open) accept(comp.active); else complete(); }
    else if (open && (ev.key === "ArrowDown" || ev.key === "ArrowUp")) {
      ev.preventDefault(); comp.active = (comp.active + (ev.key === "ArrowDown" ? 1 : comp.items.length - 1)) % comp.items.length; drawCompletions();
    } else if (open && ev.key === "Enter") { ev.preventDefault(); accept(comp.active); }
    else if (ev.key === "Escape") { comp.items = []; drawCompletions(); }
    else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runLql(); }
    else if (open) { comp.items = []; drawCompletions(); }
  });
  $("lql-run").addEventListener("click", runLql);
  async function runLql() {
    var out = $("lql-out"), text = $("lql-input").value.trim();
    if (!text) return;
    out.textContent = "running …";
    try {
      var d = await api("POST", "/v1/lql", { statement: text });
      out.textContent = d.results.map(function (r) { return "lql> " + r.statement + "\n" + (r.error ? "Error: " + r.error : r.output); }).join("\n\n");
    } catch (e) { out.textContent = "Error: " + e.message; }
  }

  connect();
})();
