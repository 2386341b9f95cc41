"""The dashboard's page, script and style, served by Mixer (mixer/dashboard.py): no CDN,
nothing fetched from the internet. Kept as strings so the one-file build carries them."""

INDEX = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshctl dashboard</title>
<link rel="stylesheet" href="/dashboard/style.css">
</head>
<body>
<header>
  <h1>meshctl</h1>
  <span id="status" class="status">connecting…</span>
</header>
<main>
  <section class="graph-panel">
    <h2>Service graph <small id="window"></small></h2>
    <!-- nodes: app and version; a node marked "service": requests that reached no workload (faults at the caller, no endpoint) -->
    <svg id="graph" role="img" aria-label="service graph" viewBox="0 0 800 300"></svg>
    <p class="legend"><span class="sw ok"></span>no errors <span class="sw warn"></span>&lt; 5 % errors
      <span class="sw bad"></span>&ge; 5 % errors &nbsp; solid: mTLS, dashed: plaintext</p>
  </section>
  <section>
    <h2>Golden signals</h2>
    <table id="services"><thead><tr><th>service</th><th>version</th><th>rps</th><th>success</th>
      <th>p50</th><th>p99</th><th>errors</th><th>rps, last 2 min</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Trends <small id="trend-span"></small></h2>
    <table id="trends"><thead><tr><th>service</th><th>requests / s</th><th>error rate</th><th>p99 latency</th>
      <th>traces</th></tr></thead><tbody></tbody></table>
  </section>
  <section class="two">
    <div>
      <h2>Faults in force</h2>
      <table id="faults"><thead><tr><th>service</th><th>fault</th><th>match</th><th>subset</th><th>time left</th></tr></thead>
        <tbody></tbody></table>
    </div>
    <div>
      <h2>Rules applied</h2>
      <table id="rules"><thead><tr><th>kind</th><th>name</th><th>from</th></tr></thead><tbody></tbody></table>
    </div>
  </section>
</main>
<script src="/dashboard/app.js"></script>
</body>
</html>
'''

APP_JS = r'''// meshctl dashboard: plain JavaScript and SVG, fed by server-sent events from Mixer.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const history = {};  // "service version" -> [rps, ...] (the last 120 events)
let last = null;
const W = 160, H = 46, COL = 330, ROW = 90;  // node size, column and row steps of the layout

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v, digits) { return v === null || v === undefined ? "-" : v.toFixed(digits); }
function ms(v) { return v === null || v === undefined ? "-" : (v < 10 ? v.toFixed(1) : Math.round(v)) + " ms"; }
function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(1) + " %"; }
function dur(s) {
  if (s === null || s === undefined) return "until cleared";
  s = Math.max(0, Math.round(s));
  return s >= 60 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s";
}

function layout(nodes, edges) {
  const depth = {}, incoming = {};
  nodes.forEach(n => { depth[n.id] = 0; incoming[n.id] = 0; });
  edges.forEach(e => { incoming[e.target] = (incoming[e.target] || 0) + 1; });
  for (let i = 0; i < nodes.length; i++) {  // longest path from a caller; bounded for cycles
    let moved = false;
    edges.forEach(e => {
      if (e.source !== e.target && depth[e.target] < depth[e.source] + 1 && depth[e.source] + 1 < nodes.length) {
        depth[e.target] = depth[e.source] + 1; moved = true;
      }
    });
    if (!moved) break;
  }
  const cols = {};
  nodes.forEach(n => { (cols[depth[n.id]] = cols[depth[n.id]] || []).push(n); });
  const pos = {};
  let rows = 1, ncols = 0;
  Object.keys(cols).forEach(d => {
    cols[d].sort((a, b) => a.id < b.id ? -1 : 1);
    rows = Math.max(rows, cols[d].length);
    ncols = Math.max(ncols, +d + 1);
    cols[d].forEach((n, i) => { pos[n.id] = { x: 20 + d * COL, y: 30 + i * ROW }; });
  });
  return { pos, width: Math.max(800, 40 + ncols * COL - (COL - W)), height: Math.max(200, 40 + rows * ROW) };
}

function drawGraph(st) {
  const svg = document.getElementById("graph");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs");
  ["ok", "warn", "bad", "idle"].forEach(c => {
    const m = el("marker", { id: "arrow-" + c, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
                             orient: "auto-start-reverse" });
    m.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: { ok: "#2f9e5b", warn: "#e59b1d", bad: "#e5484d", idle: "#b8bfcc" }[c] }));
    defs.appendChild(m);
  });
  svg.appendChild(defs);
  if (!st.nodes.length) {
    svg.setAttribute("viewBox", "0 0 800 120");
    svg.appendChild(el("text", { x: 20, y: 60, class: "empty" }, "No traffic yet: send requests through the mesh."));
    return;
  }
  const L = layout(st.nodes, st.edges);
  svg.setAttribute("viewBox", `0 0 ${L.width} ${L.height}`);
  const failing = {};
  st.edges.forEach(e => {
    const cls = e.rps === 0 || e.error_rate === null ? "idle" : e.error_rate >= 0.05 ? "bad" : e.error_rate > 0 ? "warn" : "ok";
    if (cls === "bad") failing[e.target] = true;
    const a = L.pos[e.source], b = L.pos[e.target];
    const g = el("g", { class: `edge ${cls} ${e.mtls ? "mtls" : "plain"}`, "data-source": e.source, "data-target": e.target });
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    g.appendChild(el("path", { d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, "marker-end": `url(#arrow-${cls})` }));
    const line1 = `${fmt(e.rps, 1)} rps · ${e.error_rate === null ? "-" : (100 * e.error_rate).toFixed(0) + "% err"}`;
    const line2 = `p99 ${ms(e.p99)}${e.mtls ? " · mTLS" : ""}`;
    const label = `${line1} · ${line2}`;
    const tx = el("text", { x: mx, y: (y1 + y2) / 2 - 18, "text-anchor": "middle" });
    tx.appendChild(el("tspan", { x: mx, dy: 0 }, line1));
    tx.appendChild(el("tspan", { x: mx, dy: 13 }, line2));
    g.appendChild(tx);
    const t = el("title"); t.textContent = `${e.source} → ${e.target}: ${label} (${e.total} requests in all)`;
    g.appendChild(t);
    svg.appendChild(g);
  });
  st.nodes.forEach(n => {
    const p = L.pos[n.id];
    const gw = n.service.indexOf("gateway") >= 0 || n.service === "unknown";
    const g = el("g", { class: `node${gw ? " gateway" : ""}${failing[n.id] ? " failing" : ""}`, "data-id": n.id,
                        transform: `translate(${p.x},${p.y})` });
    g.appendChild(el("rect", { width: W, height: H, rx: 8 }));
    g.appendChild(el("text", { x: 10, y: 19, class: "svc" }, n.service));
    g.appendChild(el("text", { x: 10, y: 36, class: "ver" }, n.version || (gw ? "" : "service")));
    svg.appendChild(g);
  });
}

function spark(points) {
  const s = el("svg", { class: "spark", viewBox: "0 0 120 22", preserveAspectRatio: "none" });
  if (points.length > 1) {
    const max = Math.max(1e-9, ...points);
    const step = 120 / (points.length - 1);
    s.appendChild(el("polyline", { points: points.map((v, i) => `${(i * step).toFixed(1)},${(20 - 18 * v / max).toFixed(1)}`).join(" ") }));
  }
  return s;
}

// A small time-series chart drawn by hand: points {age, value} over the last `span` seconds,
// the newest at the right edge; a gap where a step had no value. Labelled with its latest and max.
function chart(points, span, key, unit, kind) {
  const CW = 200, CH = 46, PAD = 2;
  const vals = points.filter(p => p[key] !== null && p[key] !== undefined);
  const max = Math.max(kind === "ratio" ? 0.05 : 1e-9, ...vals.map(p => p[key]));
  const s = el("svg", { class: `chart ${kind}`, viewBox: `0 0 ${CW} ${CH}`, "data-metric": key,
                        "data-points": String(vals.length), "data-max": String(vals.length ? Math.max(...vals.map(p => p[key])) : 0) });
  s.appendChild(el("line", { x1: 0, y1: CH - PAD, x2: CW, y2: CH - PAD, class: "axis" }));
  const x = age => CW - CW * Math.min(age, span) / span;
  const y = v => CH - PAD - (CH - 2 * PAD - 12) * v / max;
  let run = [];
  const runs = [];
  points.forEach(p => {
    const v = p[key];
    if (v === null || v === undefined) { if (run.length) runs.push(run); run = []; return; }
    run.push(`${x(p.age).toFixed(1)},${y(v).toFixed(1)}`);
  });
  if (run.length) runs.push(run);
  runs.forEach(r => {
    if (r.length === 1) { const [cx, cy] = r[0].split(","); s.appendChild(el("circle", { cx, cy, r: 1.8 })); }
    else s.appendChild(el("polyline", { points: r.join(" ") }));
  });
  const lastV = vals.length ? vals[vals.length - 1][key] : null;
  const show = v => v === null ? "-" : kind === "ratio" ? (100 * v).toFixed(1) + " %" : kind === "ms" ? ms(v) : fmt(v, 1) + unit;
  s.appendChild(el("text", { x: 2, y: 10, class: "lbl" }, `now ${show(lastV)} · max ${vals.length ? show(Math.max(...vals.map(p => p[key]))) : "-"}`));
  const t = el("title"); t.textContent = `${key} over the last ${Math.round(span / 60)} min`; s.appendChild(t);
  return s;
}

function traceLink(service, tracing) {
  const ns = service.indexOf(".") >= 0 ? "" : ".default";
  if (tracing && tracing.zipkin_ui) {
    const a = document.createElement("a");
    a.href = `${tracing.zipkin_ui}?serviceName=${encodeURIComponent(service + ns)}&lookback=15m&limit=10`;
    a.target = "_blank"; a.rel = "noopener"; a.className = "traces"; a.textContent = "recent traces ↗";
    return a;
  }
  if (tracing && tracing.otlp) {  // no trace UI known: Mixer's own list, from the proxies' last spans
    const a = document.createElement("a");
    a.href = `/dashboard/traces?service=${encodeURIComponent(service)}`;
    a.className = "traces"; a.textContent = "recent traces";
    return a;
  }
  const span = document.createElement("span");
  span.className = "muted";
  span.textContent = "tracing off";
  return span;
}

function rowsInto(id, rows, empty) {
  const tb = document.querySelector(`#${id} tbody`);
  tb.textContent = "";
  if (!rows.length) {
    const tr = document.createElement("tr"); tr.className = "empty";
    const td = document.createElement("td"); td.colSpan = 8; td.textContent = empty; tr.appendChild(td); tb.appendChild(tr);
    return;
  }
  rows.forEach(cells => {
    const tr = document.createElement("tr");
    if (cells.cls) tr.className = cells.cls;
    for (const k in cells.data || {}) tr.dataset[k] = cells.data[k];
    cells.td.forEach(c => {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else if (typeof c === "object" && c) { td.textContent = c.t; td.className = c.cls; }
      else td.textContent = c;
      tr.appendChild(td);
    });
    tb.appendChild(tr);
  });
}

function render(st) {
  last = st;
  document.getElementById("window").textContent = `(last ${st.window} s)`;
  drawGraph(st);
  rowsInto("services", st.services.map(s => {
    const key = `${s.service} ${s.version}`;
    const h = history[key] = (history[key] || []).concat([s.rps]).slice(-120);
    return { data: { service: s.service, version: s.version },
             td: [s.service, s.version, { t: fmt(s.rps, 1), cls: "num" }, { t: pct(s.success_rate), cls: "num" },
                  { t: ms(s.p50), cls: "num" }, { t: ms(s.p99), cls: "num" }, { t: String(s.errors), cls: "num" }, spark(h)] };
  }), "no services seen yet");
  const span = st.series_span;
  document.getElementById("trend-span").textContent = `(last ${Math.round(span / 60)} min, ${Math.round(st.series_covered)} s recorded)`;
  rowsInto("trends", Object.keys(st.series).sort().map(svc => {
    const pts = st.series[svc];
    return { data: { service: svc },
             td: [svc, chart(pts, span, "rps", " rps", "rate"), chart(pts, span, "error_rate", "", "ratio"),
                  chart(pts, span, "p99", "", "ms"), traceLink(svc, st.tracing)] };
  }), "no traffic recorded yet");
  renderFaults();
  rowsInto("rules", st.rules.map(r => ({ td: [r.kind, `${r.namespace}/${r.name}`, r.source] })), "no rules applied");
  const when = new Date(st.time * 1000).toLocaleTimeString();
  const status = document.getElementById("status");
  status.className = "status live";
  status.textContent = `live · updated ${when} · ${st.targets} proxies scraped` + (st.failing.length ? ` · ${st.failing.length} not answering` : "");
}

function renderFaults() {
  if (!last) return;
  const now = Date.now() / 1000;
  rowsInto("faults", last.faults.filter(f => f.expires === null || f.expires > now).map(f => ({
    cls: "fault", data: { service: f.service },
    td: [f.service, f.fault, f.match || "every request", f.subset || "-", dur(f.expires === null ? null : f.expires - now)],
  })), "no faults injected");
}

function connect() {
  const es = new EventSource("/dashboard/events");
  es.addEventListener("state", ev => render(JSON.parse(ev.data)));
  es.onerror = () => {
    const status = document.getElementById("status");
    status.className = "status down";
    status.textContent = "connection to Mixer lost; retrying…";
  };
}
setInterval(renderFaults, 1000);  // time left counts down between events
connect();
'''

STYLE = r'''* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, "DejaVu Sans", sans-serif; color: #1d2330; background: #f4f6fa; }
header { display: flex; align-items: baseline; gap: 1em; padding: 10px 20px; background: #1d2b4a; color: #fff; }
header h1 { margin: 0; font-size: 20px; }
.status { font-size: 13px; opacity: .85; }
.status.live::before { content: "\25CF  "; color: #4cd07d; }
.status.down::before { content: "\25CF  "; color: #e5484d; }
main { padding: 12px 20px; display: grid; gap: 14px; }
section { background: #fff; border-radius: 8px; padding: 10px 14px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
section.two { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; background: none; box-shadow: none; padding: 0; }
section.two > div { background: #fff; border-radius: 8px; padding: 10px 14px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { margin: 0 0 8px; font-size: 15px; }
h2 small { font-weight: normal; color: #667; }
#graph { width: 100%; height: auto; min-height: 220px; max-height: 520px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #e6e9f0; white-space: nowrap; }
th { color: #556; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.empty td { color: #889; font-style: italic; }
.node rect { fill: #fff; stroke: #3c5a99; stroke-width: 1.5; rx: 8; }
.node.gateway rect { fill: #eef3ff; }
.node.failing rect { stroke: #e5484d; stroke-width: 2.5; }
.node .svc { font-weight: 600; font-size: 13px; }
.node .ver { font-size: 11px; fill: #556; }
.edge path { fill: none; stroke-width: 2; }
.edge.ok path { stroke: #2f9e5b; }
.edge.warn path { stroke: #e59b1d; }
.edge.bad path { stroke: #e5484d; }
.edge.idle path { stroke: #b8bfcc; }
.edge.plain path { stroke-dasharray: 6 4; }
.edge text { font-size: 11px; fill: #1d2330; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.legend { font-size: 12px; color: #556; margin: 4px 0 0; }
.sw { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin: 0 4px 0 10px; }
.sw.ok { background: #2f9e5b; } .sw.warn { background: #e59b1d; } .sw.bad { background: #e5484d; }
tr.fault td { color: #a3262a; font-weight: 600; }
svg.spark { width: 120px; height: 22px; }
svg.chart { width: 200px; height: 46px; background: #fafbfd; border-radius: 4px; }
svg.chart polyline { fill: none; stroke-width: 1.5; stroke: #3c5a99; }
svg.chart.ratio polyline { stroke: #e5484d; } svg.chart.ms polyline { stroke: #8a5cc2; }
svg.chart circle { fill: #3c5a99; }
svg.chart .axis { stroke: #d5dae3; stroke-width: 1; }
svg.chart .lbl { font-size: 9px; fill: #556; }
a.traces { color: #3c5a99; text-decoration: none; font-weight: 600; }
.muted { color: #889; font-size: 12px; }
details.trace { border-bottom: 1px solid #e6e9f0; padding: 4px 0; }
details.trace.error summary { color: #a3262a; }
details.trace ul { list-style: none; margin: 4px 0 6px; padding: 0; font-size: 12px; }
svg.spark polyline { fill: none; stroke: #3c5a99; stroke-width: 1.5; }
'''

LOGIN = r'''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshctl dashboard</title></head>
<body style="font: 15px system-ui, sans-serif; margin: 40px">
<h1>meshctl dashboard</h1>
<p>This page needs the dashboard token of this mesh. Run <code>meshctl dashboard</code> and open the URL it prints.</p>
</body></html>
'''


# The answer to /dashboard/?token=T: the cookie is set; this page moves on to the dashboard.
ENTER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/dashboard/">
<title>meshctl dashboard</title></head>
<body style="font: 15px system-ui, sans-serif; margin: 40px"><p><a href="/dashboard/">Open the dashboard</a></p></body></html>
"""
