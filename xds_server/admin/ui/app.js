// The live mesh page: polls /api/v1/ui/mesh with a read token and draws it. No framework, no
// CDN. Every value from the server is set as text (proxy ids and NACK messages come from
// proxies: never parsed as HTML).
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 170, NODE_H = 38, COL_GAP = 160, ROW_GAP = 12, PAD = 16;
const TOKEN_KEY = "xds-server-ui-token";

let token = null;
let timer = null;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function hue(text) {
  let h = 0;
  for (const c of text) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

function rate(rps) {
  if (rps >= 100) return rps.toFixed(0);
  if (rps >= 10) return rps.toFixed(1);
  return rps.toFixed(2);
}

function pct(ratio) {
  return (ratio * 100).toFixed(ratio >= 0.1 ? 0 : 1) + " %";
}

function errorClass(ratio) {
  return ratio < 0.01 ? "ok" : ratio < 0.05 ? "warn" : "bad";
}

const COLORS = { ok: "#2e9d62", warn: "#d89b16", bad: "#d64545" };

// Layout: one lane per namespace, stacked; inside a lane, columns by longest path over the
// lane's own edges (cycles broken where a depth-first walk meets them), rows ordered by their
// callers' rows (fewer crossings), then by name, so positions stay put while rates change.
const LANE_HEAD = 26, LANE_GAP = 16, LANE_LEFT = 100;

function layers(members, links) {
  const out = new Map(members.map(n => [n.id, []]));
  for (const e of links) if (out.has(e.source) && out.has(e.target)) out.get(e.source).push(e.target);
  const state = new Map(), order = [], back = new Set();
  const visit = id => {  // iterative-enough: lanes are small; recursion depth <= lane size
    state.set(id, 1);
    for (const t of out.get(id)) {
      if (state.get(t) === 1) back.add(id + "\u0000" + t);
      else if (!state.has(t)) visit(t);
    }
    state.set(id, 2);
    order.push(id);
  };
  for (const n of members) if (!state.has(n.id)) visit(n.id);
  const layer = new Map(members.map(n => [n.id, 0]));
  for (const id of order.reverse()) {
    for (const t of out.get(id)) {
      if (!back.has(id + "\u0000" + t)) layer.set(t, Math.max(layer.get(t), layer.get(id) + 1));
    }
  }
  return layer;
}

function layout(nodes, edges) {
  const ids = new Set(nodes.map(n => n.id));
  const links = edges.filter(e => ids.has(e.source) && ids.has(e.target) && e.source !== e.target);
  const byId = new Map(nodes.map(n => [n.id, n]));
  const lanes = new Map();
  for (const n of nodes) {
    if (!lanes.has(n.namespace)) lanes.set(n.namespace, []);
    lanes.get(n.namespace).push(n);
  }
  const callers = new Map(nodes.map(n => [n.id, []]));
  for (const e of links) callers.get(e.target).push(e.source);
  const pos = new Map(), bands = [];
  let y = PAD, width = 0;
  for (const ns of [...lanes.keys()].sort()) {
    const members = lanes.get(ns);
    const inner = links.filter(e => byId.get(e.source).namespace === ns && byId.get(e.target).namespace === ns);
    const layer = layers(members, inner);
    const columns = [];
    for (const n of members) (columns[layer.get(n.id)] ||= []).push(n);
    let rows = 0;
    columns.forEach((column, c) => {
      if (!column) return;
      const key = n => {
        const ys = callers.get(n.id).map(id => pos.get(id)).filter(p => p).map(p => p.y);
        return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Infinity;
      };
      column.sort((a, b) => (key(a) - key(b)) || a.name.localeCompare(b.name));
      column.forEach((n, row) => pos.set(n.id, { x: LANE_LEFT + c * (NODE_W + COL_GAP),
                                                 y: y + LANE_HEAD + row * (NODE_H + ROW_GAP) }));
      rows = Math.max(rows, column.length);
      width = Math.max(width, LANE_LEFT + c * (NODE_W + COL_GAP) + NODE_W + PAD);
    });
    const height = LANE_HEAD + rows * (NODE_H + ROW_GAP);
    bands.push({ ns, y, height });
    y += height + LANE_GAP;
  }
  return { pos, bands, width, height: y + PAD };
}

// A point of a cubic Bezier curve at t.
function bezier(p0, p1, p2, p3, t) {
  const u = 1 - t;
  return u * u * u * p0 + 3 * u * u * t * p1 + 3 * u * t * t * p2 + t * t * t * p3;
}

// The curve from a to b and where its label goes (`at`: 0 at a, 1 at b), so labels of edges
// leaving one node spread along their curves instead of piling up at the source.
function edgePath(a, b, bend, at) {
  let x = [], y = [];
  if (b.x > a.x + NODE_W) {  // forward: right side to left side
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2 + bend, x2 = b.x - 2, y2 = b.y + NODE_H / 2 + bend;
    const dx = Math.max(40, (x2 - x1) / 2);
    x = [x1, x1 + dx, x2 - dx, x2]; y = [y1, y1, y2, y2];
  } else if (Math.abs(b.x - a.x) < NODE_W) {  // same column (another lane, or a cycle): out left
    const y1 = a.y + NODE_H / 2 + bend, y2 = b.y + NODE_H / 2 + bend;
    const out = 30 + Math.min(30, Math.abs(y2 - y1) / 12);
    x = [a.x, a.x - out, b.x - out, b.x - 2]; y = [y1, y1, y2, y2];
  } else {  // backward: around below the boxes
    const low = Math.max(a.y, b.y) + NODE_H + 24;
    const sx = a.x + NODE_W / 2 + bend, tx = b.x + NODE_W / 2 + bend;
    x = [sx, sx, tx, tx]; y = [a.y + NODE_H, low, low, b.y + NODE_H + 2];
  }
  return { d: `M${x[0]},${y[0]} C${x[1]},${y[1]} ${x[2]},${y[2]} ${x[3]},${y[3]}`,
           mx: bezier(...x, at), my: bezier(...y, at) };
}

function drawGraph(data) {
  const graph = document.getElementById("graph");
  const nodes = data.nodes;
  document.getElementById("graph-empty").hidden = nodes.length > 0;
  const { pos, bands, width, height } = layout(nodes, data.edges);
  graph.setAttribute("width", Math.max(width, 300));
  graph.setAttribute("height", Math.max(height, 120));
  graph.replaceChildren();
  const defs = svg("defs");
  for (const [name, color] of Object.entries({ ...COLORS, route: "#8a94a6" })) {
    const marker = svg("marker", { id: `arrow-${name}`, viewBox: "0 0 10 10", refX: 9, refY: 5,
                                   markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse",
                                   orient: "auto-start-reverse" });
    marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: color }));
    defs.append(marker);
  }
  graph.append(defs);
  const laneLayer = svg("g", { class: "lanes" });
  for (const band of bands) {
    const lane = svg("g", { class: "lane", "data-namespace": band.ns });
    lane.append(svg("rect", { x: 8, y: band.y, width: Math.max(width, 300) - 16, height: band.height,
                              rx: 10, fill: `hsla(${hue(band.ns)},55%,55%,0.06)` }));
    lane.append(svg("text", { x: 20, y: band.y + 17, class: "lane-name",
                              fill: `hsl(${hue(band.ns)},40%,38%)` }, band.ns));
    laneLayer.append(lane);
  }
  graph.append(laneLayer);
  const edgeLayer = svg("g", { class: "edges" });
  const labelLayer = svg("g", { class: "labels" });
  const hot = new Set();
  const shares = new Map();  // backend id -> "parent NN %" of the route sending to it
  const byId = new Map(nodes.map(n => [n.id, n]));
  for (const e of data.edges) {
    const a = pos.get(e.source), b = pos.get(e.target);
    if (!a || !b) continue;
    const traffic = e.kind === "traffic";
    const g = svg("g", { class: `edge ${e.kind}`, "data-source": e.source, "data-target": e.target });
    const { d, mx, my } = edgePath(a, b, traffic ? 0 : 6, 0.68);
    let label = "", title;
    if (traffic) {
      const cls = errorClass(e.error_ratio);
      const widthPx = 1.5 + Math.min(6, Math.log2(1 + e.rps));
      g.setAttribute("data-rps", e.rps);
      g.setAttribute("data-error-ratio", e.error_ratio);
      g.append(svg("path", { d, stroke: COLORS[cls], "stroke-width": widthPx.toFixed(2),
                             "marker-end": `url(#arrow-${cls})` }));
      label = `${rate(e.rps)}/s · ${pct(e.error_ratio)}`;
      title = `${e.source} → ${e.target}: ${rate(e.rps)} requests/s, ${pct(e.error_ratio)} errors, ` +
              `${e.in_flight} in flight`;
      if (e.rps > 0) { hot.add(e.source); hot.add(e.target); }
    } else {
      // Unlabelled: the share is written on the backend's box (labels of crossing route and
      // traffic edges would collide).
      g.append(svg("path", { d, "marker-end": "url(#arrow-route)" }));
      title = `route ${e.route}: ${e.weight_percent} % of ${e.source} to ${e.target}`;
      const parent = byId.get(e.source);
      if (!shares.has(e.target)) shares.set(e.target, `${parent ? parent.name : e.source} ${e.weight_percent} %`);
    }
    g.append(svg("title", {}, title));
    edgeLayer.append(g);
    if (!label) continue;
    const text = svg("text", { x: mx, y: my - 4, "text-anchor": "middle", class: "edge-label" }, label);
    const lg = svg("g", { class: `edge ${e.kind}` });
    lg.append(text);
    labelLayer.append(lg);
  }
  const nodeLayer = svg("g", { class: "nodes" });
  for (const n of nodes) {
    const p = pos.get(n.id);
    const g = svg("g", { class: `node ${n.kind}${hot.has(n.id) ? " hot" : ""}`, "data-id": n.id,
                         transform: `translate(${p.x},${p.y})` });
    g.append(svg("rect", { class: "box", width: NODE_W, height: NODE_H, rx: 8 }));
    g.append(svg("rect", { class: "stripe", width: 5, height: NODE_H, rx: 2,
                           fill: `hsl(${hue(n.namespace)},55%,55%)` }));
    g.append(svg("text", { class: "ns", x: 12, y: 13 }, n.kind === "workload" ? `${n.namespace} · workload` : n.namespace));
    g.append(svg("text", { class: "name", x: 12, y: 27 }, n.name.length > 20 ? n.name.slice(0, 19) + "…" : n.name));
    const meta = n.kind === "service" ? `${n.endpoints} ep` + (n.rps > 0 ? ` · ${rate(n.rps)}/s` : "") : "";
    g.append(svg("text", { class: "meta", x: NODE_W - 8, y: 27, "text-anchor": "end" }, meta));
    if (shares.has(n.id)) {
      g.append(svg("text", { class: "share", x: NODE_W - 8, y: 13, "text-anchor": "end" }, `◂ ${shares.get(n.id)}`));
    }
    g.append(svg("title", {}, `${n.id}: ${n.endpoints} ready endpoints, ${rate(n.rps)} requests/s in, ` +
                              `${pct(n.error_ratio)} errors, ${n.in_flight} in flight`));
    nodeLayer.append(g);
  }
  graph.append(edgeLayer, nodeLayer, labelLayer);
}

function drawProxies(proxies, counts) {
  const body = document.querySelector("#proxies tbody");
  body.replaceChildren();
  const order = { NACKED: 0, STALE: 1, "NOT SENT": 2, SYNCED: 3 };
  const sorted = [...proxies].sort((a, b) => (order[a.status] - order[b.status]) || a.id.localeCompare(b.id));
  for (const p of sorted) {
    const tr = el("tr", { "data-proxy": p.id, "data-status": p.status });
    const id = el("td", { class: "id", title: p.identity || "" }, p.id);
    const status = el("td");
    status.append(el("span", { class: `status ${p.status}` }, p.status));
    const dots = el("td", { class: "dots" });
    for (const t of ["CDS", "LDS", "EDS", "RDS", "SDS"]) {
      dots.append(el("span", { class: p.types[t] || "", title: `${t}: ${p.types[t] || "not used"}` }));
    }
    tr.append(id, status, dots);
    body.append(tr);
  }
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  document.getElementById("proxy-count").textContent =
    total > proxies.length ? `${total} (the ${proxies.length} worst shown)` : String(total);
  const nacks = document.getElementById("nacks");
  nacks.replaceChildren();
  for (const p of sorted) {
    for (const err of p.errors) {
      const box = el("div", { class: "nack", "data-proxy": p.id });
      box.append(el("b", {}, `${p.id} rejected ${err.type}`), el("code", {}, err.message));
      nacks.append(box);
    }
  }
}

function drawList(id, items, render, none) {
  const list = document.getElementById(id);
  list.replaceChildren();
  if (!items.length) list.append(el("li", { class: "none" }, none));
  for (const item of items) list.append(render(item));
}

function duration(seconds) {
  if (seconds < 0) return "expired";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function drawSummary(data) {
  const summary = document.getElementById("summary");
  const services = data.nodes.filter(n => n.kind === "service").length;
  const rps = data.edges.filter(e => e.kind === "traffic").reduce((s, e) => s + e.rps, 0);
  const counts = data.proxy_counts;
  const proxies = Object.values(counts).reduce((a, b) => a + b, 0);
  const pills = [["services", services], ["proxies", proxies], ["req/s", rate(rps)],
                 ["NACKED", counts.NACKED || 0], ["STALE", counts.STALE || 0],
                 ["source errors", data.source_errors.length]];
  summary.replaceChildren(...pills.map(([k, v]) => {
    const pill = el("span", { class: "pill" });
    pill.append(el("b", {}, String(v)), document.createTextNode(` ${k}`));
    return pill;
  }));
}

function render(data) {
  drawSummary(data);
  drawGraph(data);
  drawProxies(data.proxies, data.proxy_counts);
  const certs = data.certificates.expiring;
  document.getElementById("cert-count").textContent = `${certs.length} of ${data.certificates.issued}`;
  drawList("certificates", certs, c => {
    const li = el("li", { "data-spiffe-id": c.spiffe_id });
    li.append(el("span", { class: "when" }, duration(c.seconds_left)), document.createTextNode(` ${c.spiffe_id}`));
    return li;
  }, "none: every certificate has more than a quarter of its lifetime left");
  document.getElementById("error-count").textContent = String(data.source_errors.length);
  drawList("source-errors", data.source_errors, e => el("li", {}, `${e.source}: ${e.text}`), "none");
  const updated = document.getElementById("updated");
  updated.textContent = `updated ${new Date().toLocaleTimeString()}` +
    (data.load_report_interval ? ` · load reports every ${data.load_report_interval} s` : "");
  updated.classList.remove("stale");
}

async function poll() {
  clearTimeout(timer);
  try {
    const response = await fetch("/api/v1/ui/mesh", { headers: { Authorization: `Bearer ${token}` },
                                                      cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(response.status === 401 ? "That token was refused." : "That token may not read.");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (err) {
    const updated = document.getElementById("updated");
    updated.textContent = `cannot reach the server (${err.message}); retrying`;
    updated.classList.add("stale");
  }
  timer = setTimeout(poll, POLL_MS);
}

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("updated").textContent = "";
}

function start(value) {
  token = value;
  sessionStorage.setItem(TOKEN_KEY, value);
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const fragment = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fragment) history.replaceState(null, "", location.pathname);  // out of the address bar
  document.getElementById("login").addEventListener("submit", event => {
    event.preventDefault();
    const value = document.getElementById("token").value.trim();
    if (value) start(value);
  });
  const saved = fragment || sessionStorage.getItem(TOKEN_KEY);
  if (saved) start(saved); else showLogin();
});
