// Tessera's dashboard. Plain JavaScript, no dependencies: it reads the hub's API
// (/api/v1/...) and the dashboard's (/ui/api/..., /ui/events) on this origin only, and
// renders every value as text (textContent), never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const view = document.getElementById("view");
const state = { runs: [], nodes: [], connected: false, route: [] };

// ---- building elements -------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "onclick") e.addEventListener("click", v);
    else e.setAttribute(k, String(v));
  }
}

function append(e, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function show(...children) {
  view.replaceChildren();
  append(view, children);
}

function table(headers, rows, attrs) {
  return el("table", attrs, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

function fact(k, v) {
  return el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v));
}

function fmt(x, digits = 4) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "-";
}

function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function enc(s) {
  return encodeURIComponent(s);
}

async function getJson(url) {
  const r = await fetch(url, { headers: { accept: "application/json" } });
  if (!r.ok) {
    let why = `${r.status}`;
    try { why = (await r.json()).error || why; } catch (_) { /* not JSON */ }
    throw new Error(`${url}: ${why}`);
  }
  return r.json();
}

// ---- charts ------------------------------------------------------------------------

// A line chart of per-round series: [{name, cls, points: [[round, value], ...]}].
function lineChart(id, title, series, opts = {}) {
  const W = 440, H = 220, L = 46, R = 12, T = 24, B = 30;
  const all = series.flatMap((s) => s.points);
  const rounds = all.map((p) => p[0]);
  const x0 = Math.min(...rounds, 1), x1 = Math.max(...rounds, 1);
  let y0 = opts.min ?? Math.min(...all.map((p) => p[1]), 0);
  let y1 = opts.max ?? Math.max(...all.map((p) => p[1]), 1e-9);
  if (y1 <= y0) y1 = y0 + 1;
  const X = (r) => L + (x1 === x0 ? (W - L - R) / 2 : ((r - x0) / (x1 - x0)) * (W - L - R));
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const g = svg("svg", { id, width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  append(g, [
    svg("text", { x: L, y: 14, class: "title" }, title),
    svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
  ]);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    append(g, [svg("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, fmt(v, opts.digits ?? 2))]);
  }
  const ticks = Math.min(x1 - x0 + 1, 10);
  for (let i = 0; i < ticks; i++) {
    const r = Math.round(x0 + ((x1 - x0) * i) / Math.max(ticks - 1, 1));
    append(g, [svg("text", { x: X(r), y: H - B + 16, "text-anchor": "middle" }, r)]);
  }
  append(g, [svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }, "round")]);
  let legend = W - R;
  for (const s of series.slice().reverse()) {
    if (!s.points.length) continue;
    append(g, [svg("text", { x: legend, y: 14, "text-anchor": "end", class: `legend ${s.cls}` }, `— ${s.name}`)]);
    legend -= 8 * s.name.length + 26;
  }
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    append(g, [svg("path", { d, class: s.cls, "data-series": s.name })]);
    for (const [r, v] of s.points) {
      append(g, [svg("circle", { cx: X(r), cy: Y(v), r: 3, class: `point ${s.cls}`, "data-round": r, "data-series": s.name, "data-value": v },
        svg("title", {}, `round ${r}: ${s.name} ${fmt(v)}`))]);
    }
  }
  return el("div", { class: "chart" }, g);
}

// A bar chart of per-round values: [{round, value, failed}].
function barChart(id, title, bars, unit) {
  const W = 440, H = 220, L = 46, R = 12, T = 24, B = 30;
  const max = Math.max(...bars.map((b) => b.value), 1e-9);
  const w = (W - L - R) / Math.max(bars.length, 1);
  const g = svg("svg", { id, width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title },
    svg("text", { x: L, y: 14, class: "title" }, title),
    svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
    svg("text", { x: L - 6, y: T + 4, "text-anchor": "end" }, fmt(max, 2)),
    svg("text", { x: L - 6, y: H - B, "text-anchor": "end" }, "0"),
    svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }, unit === "s" ? "seconds" : unit));
  const every = Math.ceil(bars.length / 10);
  bars.forEach((b, i) => {
    const h = (b.value / max) * (H - T - B);
    if (i % every === 0) append(g, [svg("text", { x: L + i * w + w / 2, y: H - B + 16, "text-anchor": "middle" }, b.round)]);
    append(g, [svg("rect", { x: L + i * w + 1, y: H - B - h, width: Math.max(w - 2, 1), height: h, class: b.failed ? "bar failed" : "bar", "data-round": b.round, "data-value": b.value },
      svg("title", {}, `round ${b.round}: ${fmt(b.value, 3)} ${unit}${b.failed ? `, ${b.failed} failed` : ""}`))]);
  });
  return el("div", { class: "chart" }, g);
}

// ---- runs --------------------------------------------------------------------------

function runsTable(selected) {
  if (!state.connected) return el("p", { class: "empty" }, "This hub was started without a cluster (tessera hub serve --nats URL shows its runs and nodes).");
  if (!state.runs.length) return el("p", { class: "empty" }, "No runs yet.");
  return table(["Run", "Kind", "State", "Done", "Runs", "Updated", "Accuracy"], state.runs.map((r) =>
    el("tr", { class: r.id === selected ? "clickable selected" : "clickable", "data-run": r.id, onclick: () => { location.hash = `#/runs/${enc(r.id)}`; } },
      el("td", { class: "mono" }, r.id), el("td", {}, r.kind), el("td", {}, r.state), el("td", {}, r.progress),
      el("td", {}, r.runs), el("td", {}, r.updated), el("td", {}, fmt(r.test_accuracy)))), { id: "runs" });
}

async function renderRuns(id) {
  if (!id && state.runs.length) id = state.runs[0].id;
  const parts = [el("h2", {}, "Runs"), runsTable(id)];
  if (id) {
    try {
      const run = await getJson(`/ui/api/runs/${enc(id)}`);
      parts.push(run.kind === "swarm" ? swarmView(run) : sessionView(run));
    } catch (e) {
      parts.push(el("p", { class: "error" }, e.message));
    }
  }
  show(parts);
}

// A strategy is a name (`fedavg`) or a mapping with `name` and parameters.
function strategyName(st) {
  if (typeof st === "string") return st;
  return (st && st.name) || "fedavg";
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function sessionView(s) {
  const reports = s.reports || [];
  const last = reports[reports.length - 1] || {};
  const eps = reports.filter((r) => typeof r.dp_epsilon === "number");
  const points = (f) => reports.filter((r) => typeof r[f] === "number").map((r) => [r.round, r[f]]);
  const cards = el("div", { class: "cards" },
    fact("rounds", `${s.completed_rounds} / ${s.config.rounds}`),
    fact("strategy", s.config.fedbuff ? "fedbuff" : strategyName(s.config.strategy)),
    fact("test accuracy", fmt(last.eval_accuracy)),
    fact("participants", (s.contributors || []).length),
    eps.length ? fact("ε spent", fmt(eps[eps.length - 1].dp_epsilon, 3)) : null,
    fact("state", s.ending || (s.completed_rounds >= s.config.rounds ? "limit" : "running")));
  const charts = el("div", { class: "charts" },
    lineChart("chart-accuracy", "Accuracy per round", [
      { name: "test", cls: "series-accuracy", points: points("eval_accuracy") },
      { name: "federated", cls: "series-fed", points: points("fed_eval_accuracy") },
    ], { min: 0, max: 1 }),
    lineChart("chart-loss", "Loss per round", [
      { name: "test", cls: "series-loss", points: points("eval_loss") },
      { name: "train", cls: "series-train", points: points("train_loss") },
    ], { min: 0 }),
    barChart("chart-durations", "Round duration", reports.map((r) => ({ round: r.round, value: r.seconds, failed: (r.failures || []).length })), "s"),
    eps.length ? lineChart("chart-epsilon", "Privacy budget spent (ε)", [{ name: "ε", cls: "series-epsilon", points: points("dp_epsilon") }], { min: 0, digits: 2 }) : null);
  // Per participant: rounds contributed and failed, with the last error.
  const per = new Map();
  const entry = (p) => { if (!per.has(p)) per.set(p, { contributed: 0, failed: 0, selected: 0, error: "" }); return per.get(p); };
  for (const r of reports) {
    for (const p of r.selected || []) entry(p).selected++;
    for (const p of r.contributed || []) entry(p).contributed++;
    for (const f of r.failures || []) { const e = entry(f.participant || f.node); e.failed++; e.error = `round ${r.round}: ${f.error}`; }
  }
  const participants = [...per.entries()].sort((a, b) => a[0].localeCompare(b[0]));
  return el("section", { id: "run-view", "data-run": s.id },
    el("h2", {}, `Session ${s.id}`),
    el("p", { class: "muted" }, `worker ${s.module.module} `, el("span", { class: "mono" }, s.module.digest)),
    cards, charts,
    el("h3", {}, "Participants"),
    table(["Participant", "Selected", "Contributed", "Failed", "Last failure"], participants.map(([p, e]) =>
      el("tr", { "data-participant": p }, el("td", { class: "mono" }, p), el("td", {}, e.selected), el("td", {}, e.contributed),
        el("td", { class: e.failed ? "warn" : "" }, e.failed), el("td", { class: "warn" }, e.error))), { id: "participants" }),
    el("h3", {}, "Rounds"),
    table(["Round", "Contributed", "Examples", "Train loss", "Test loss", "Test accuracy", "Seconds", "Failures"], reports.slice().reverse().map((r) =>
      el("tr", { "data-round": r.round }, el("td", {}, r.round), el("td", {}, (r.contributed || []).length), el("td", {}, r.examples),
        el("td", {}, fmt(r.train_loss)), el("td", {}, fmt(r.eval_loss)), el("td", {}, fmt(r.eval_accuracy)), el("td", {}, fmt(r.seconds, 3)),
        el("td", { class: "warn" }, (r.failures || []).map((f) => `${f.participant || f.node}: ${f.error}`).join("; ")))), { id: "rounds" }));
}

function swarmView(s) {
  const reports = s.reports || [];
  return el("section", { id: "run-view", "data-run": s.id },
    el("h2", {}, `Swarm ${s.id}`),
    el("div", { class: "cards" }, fact("iterations", `${s.completed_iterations} / ${s.spec.iterations}`), fact("state", s.ending || "running"),
      s.error ? fact("error", s.error) : null),
    el("div", { class: "charts" }, barChart("chart-durations", "Iteration duration",
      reports.map((r) => ({ round: r.iteration, value: r.seconds, failed: (r.stages || []).reduce((n, st) => n + (st.failures || []).length, 0) })), "s")),
    el("h3", {}, "Iterations"),
    table(["Iteration", "Task", "Ran on", "Failures"], reports.slice().reverse().flatMap((r) => (r.stages || []).map((st) =>
      el("tr", { "data-round": r.iteration }, el("td", {}, r.iteration), el("td", {}, st.task), el("td", {}, (st.succeeded || []).join(", ")),
        el("td", { class: "warn" }, (st.failures || []).map((f) => `${f.node}: ${f.error}`).join("; "))))), { id: "rounds" }));
}

// ---- nodes and actors --------------------------------------------------------------

async function renderNodes() {
  let actors = [];
  try { actors = await getJson("/ui/api/actors"); } catch (_) { /* shown as none */ }
  const running = (id) => actors.filter((a) => a.node === id).map((a) => a.name);
  if (!state.connected) return show(el("h2", {}, "Nodes"), runsTable());
  show(el("h2", {}, `Nodes (${state.nodes.length})`),
    state.nodes.length ? table(["Node", "CPU", "Memory", "GPU", "Disk", "Datasets", "Runtimes", "Protections", "Health", "Actors"], state.nodes.map((n) =>
      el("tr", { "data-node": n.id },
        el("td", { class: "mono" }, n.id), el("td", {}, n.resources.cpu), el("td", {}, bytes(n.resources.memory)), el("td", {}, n.resources.gpu),
        el("td", {}, bytes(n.resources.disk)), el("td", {}, (n.datasets || []).join(", ")), el("td", {}, (n.runtimes || []).join(", ")),
        el("td", {}, (n.protections || []).join(", ") || "none"),
        el("td", { class: n.degraded ? "warn" : "ok" }, n.degraded ? "degraded" : "live"),
        el("td", {}, running(n.id).join(", ")))), { id: "nodes" }) : el("p", { class: "empty" }, "No node is registered."));
}

async function renderActors() {
  let actors = [];
  try { actors = await getJson("/ui/api/actors"); } catch (e) { return show(el("p", { class: "error" }, e.message)); }
  show(el("h2", {}, `Actors (${actors.length})`),
    actors.length ? table(["Actor", "Node", "Module", "Replicas", "Calls", "Busy", "Queue in", "Queue out", "Memory"], actors.map((a) =>
      el("tr", { "data-actor": a.name }, el("td", { class: "mono" }, a.name), el("td", {}, a.node), el("td", {}, a.module), el("td", {}, a.replicas),
        el("td", {}, a.calls), el("td", {}, a.busy), el("td", {}, a.queues ? a.queues.in ?? "-" : "-"), el("td", {}, a.queues ? a.queues.out ?? "-" : "-"),
        el("td", {}, bytes(a.reserved && a.reserved.memory)))), { id: "actors" }) : el("p", { class: "empty" }, "No actors (nodes with a gateway list theirs)."));
}

// ---- modules -----------------------------------------------------------------------

async function renderModules(name, version) {
  let list;
  try { list = await getJson("/api/v1/packages?all=true&limit=1000"); } catch (e) { return show(el("p", { class: "error" }, e.message)); }
  // A tree by dotted segments: fl -> fl.softmax -> fl.softmax.worker -> versions.
  const root = { children: new Map(), versions: [] };
  for (const p of list) {
    let node = root;
    const segs = p.name.split(".");
    segs.forEach((seg, i) => {
      const key = segs.slice(0, i + 1).join(".");
      if (!node.children.has(key)) node.children.set(key, { children: new Map(), versions: [] });
      node = node.children.get(key);
    });
    node.versions.push(p);
  }
  const render = (node) => [...node.children.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([key, child]) =>
    el("details", { open: true, "data-prefix": key }, el("summary", {}, key),
      child.versions.length ? el("ul", { class: "versions" }, child.versions.map((p) =>
        el("li", {}, el("a", { href: `#/modules/${enc(p.name)}/${enc(p.version)}` }, `${p.version}`), " ",
          el("span", { class: "muted" }, `${p.kind} · ${p.runtime} · ${p.description || ""}`), p.private ? el("span", { class: "warn" }, " private") : null))) : null,
      render(child)));
  const parts = [el("h2", {}, `Modules (${plural(list.length, "version", "versions")})`)];
  const tree = el("div", { id: "modules" }, render(root));
  if (!list.length) parts.push(el("p", { class: "empty" }, "Nothing published yet."));
  parts.push(tree);
  if (name) parts.unshift(await moduleDetail(name, version));
  show(parts);
}

async function moduleDetail(name, version) {
  try {
    const p = await getJson(`/api/v1/packages/${enc(name)}/${enc(version)}`);
    const card = p.card || null;
    return el("section", { id: "module-view", "data-module": `${p.name}@${p.version}` },
      el("h2", {}, `${p.name}@${p.version}`),
      el("div", { class: "cards" }, fact("kind", p.kind), fact("runtime", p.runtime), fact("size", bytes(p.size)), fact("downloads", p.downloads)),
      el("p", {}, p.description),
      el("p", { class: "muted" }, "digest ", el("span", { class: "mono" }, p.digest)),
      el("p", { class: "muted" }, "signed by ", el("span", { class: "mono" }, p.signer || "nobody (unsigned)")),
      card ? [el("h3", {}, "Card"), cardFacts(card), el("pre", { id: "card" }, card.text)] : el("p", { class: "muted" }, "No README.md card."),
      el("h3", {}, "Manifest"), el("pre", { id: "manifest" }, JSON.stringify(p.manifest, null, 2)));
  } catch (e) {
    return el("p", { class: "error" }, e.message);
  }
}

function cardFacts(card) {
  const facts = [["license", card.license], ["tags", (card.tags || []).join(", ")], ["datasets", (card.datasets || []).join(", ")],
    ["base model", card.base_model], ["library", card.library_name], ["intended use", card.intended_use],
    ["metrics", card.metrics ? JSON.stringify(card.metrics) : ""]].filter(([, v]) => v);
  return el("table", { class: "facts" }, el("tbody", {}, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
}

// ---- models and lineage ------------------------------------------------------------

async function renderModels(name, version) {
  let list;
  try { list = await getJson("/api/v1/models?limit=1000"); } catch (e) { return show(el("p", { class: "error" }, e.message)); }
  const rows = list.map((m) => el("tr", { class: "clickable", "data-model": `${m.name}@${m.version}`, onclick: () => { location.hash = `#/models/${enc(m.name)}/${enc(m.version)}`; } },
    el("td", { class: "mono" }, m.name), el("td", {}, m.version), el("td", {}, bytes(m.size)), el("td", {}, m.created_at), el("td", {}, m.downloads),
    el("td", {}, fmt(m.metadata && m.metadata.test_accuracy))));
  const parts = [el("h2", {}, `Models (${list.length})`), list.length ? table(["Model", "Version", "Size", "Created", "Downloads", "Test accuracy"], rows, { id: "models" }) : el("p", { class: "empty" }, "No models yet.")];
  if (name) parts.unshift(await modelDetail(name, version));
  show(parts);
}

async function modelDetail(name, version) {
  try {
    const [m, lineage] = await Promise.all([
      getJson(`/api/v1/models/${enc(name)}/${enc(version)}/meta`),
      getJson(`/api/v1/models/${enc(name)}/${enc(version)}/lineage`),
    ]);
    let card = null;
    try { card = await getJson(`/api/v1/models/${enc(name)}/${enc(version)}/card`); } catch (_) { /* none */ }
    return el("section", { id: "model-view", "data-model": `${m.name}@${m.version}` },
      el("h2", {}, `${m.name}@${m.version}`),
      el("p", { class: "muted" }, "digest ", el("span", { class: "mono" }, m.digest || "(no binary)"), " · signed by ", el("span", { class: "mono" }, m.signer || "nobody")),
      el("h3", {}, "Lineage"), lineageGraph(lineage),
      card ? [el("h3", {}, "Card"), cardFacts(card), el("pre", { id: "card" }, card.text)] : null,
      el("h3", {}, "Metadata"), el("pre", {}, JSON.stringify(m.metadata, null, 2)));
  } catch (e) {
    return el("p", { class: "error" }, e.message);
  }
}

// The lineage as a graph: what the run read (data sets, modules, nodes) -> the run -> the
// model -> the models built from it; the model it started from beside the run.
function lineageGraph(l) {
  const made = l.made_by;
  const inputs = made ? [
    ...(made.datasets || []).map((d) => ({ kind: "dataset", label: d })),
    ...(made.modules || []).map((m) => ({ kind: "module", label: m.module, link: moduleLink(m.module) })),
    ...(made.nodes || []).map((n) => ({ kind: "node", label: n })),
  ] : [];
  const base = l.base_model || (made && made.base_model);
  const col1 = [made ? { kind: "run", label: `${made.session}`, sub: `${made.strategy}, ${made.rounds} rounds` } : null,
    base ? { kind: "base", label: base, link: modelLink(base) } : null].filter(Boolean);
  const derived = (l.derived || []).map((d) => ({ kind: "derived", label: d, link: modelLink(d) }));
  const cols = [inputs, col1, [{ kind: "model", label: l.model }], derived];
  const BW = 210, BH = 40, GX = 70, GY = 14, PAD = 16;
  const rows = Math.max(...cols.map((c) => c.length), 1);
  const W = PAD * 2 + cols.length * BW + (cols.length - 1) * GX;
  const H = PAD * 2 + rows * BH + (rows - 1) * GY;
  const pos = (ci, i) => {
    const n = cols[ci].length;
    const top = PAD + ((rows - n) * (BH + GY)) / 2;
    return { x: PAD + ci * (BW + GX), y: top + i * (BH + GY) };
  };
  const g = svg("svg", { id: "lineage", class: "lineage", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `lineage of ${l.model}` },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9aa8bf" }))));
  const edge = (a, b) => {
    const x1 = a.x + BW, y1 = a.y + BH / 2, x2 = b.x, y2 = b.y + BH / 2;
    append(g, [svg("path", { class: "edge", d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}` })]);
  };
  const model = pos(2, 0);
  const run = made ? pos(1, 0) : null;
  inputs.forEach((_, i) => run && edge(pos(0, i), run));
  col1.forEach((_, i) => edge(pos(1, i), model));
  derived.forEach((_, i) => edge(model, pos(3, i)));
  cols.forEach((col, ci) => col.forEach((b, i) => {
    const p = pos(ci, i);
    const label = b.label.length > 30 ? `${b.label.slice(0, 29)}…` : b.label;
    append(g, [svg("g", { class: b.link ? "lnode link" : "lnode", "data-kind": b.kind, "data-label": b.label, transform: `translate(${p.x},${p.y})`, onclick: b.link ? () => { location.hash = b.link; } : null },
      svg("title", {}, `${b.kind}: ${b.label}`),
      svg("rect", { width: BW, height: BH, rx: 5 }),
      svg("text", { x: 8, y: 14, class: "kind" }, b.sub ? `${b.kind} · ${b.sub}` : b.kind),
      svg("text", { x: 8, y: 31 }, label))]);
  }));
  if (!made && !base && !derived.length) return el("p", { class: "muted", id: "lineage" }, "No lineage recorded (pushed by hand, not made by a run).");
  return el("div", { class: "chart" }, g);
}

function modelLink(ref) {
  const at = ref.lastIndexOf("@");
  return at > 0 ? `#/models/${enc(ref.slice(0, at))}/${enc(ref.slice(at + 1))}` : `#/models/${enc(ref)}/latest`;
}

function moduleLink(ref) {
  const at = ref.lastIndexOf("@");
  return at > 0 ? `#/modules/${enc(ref.slice(0, at))}/${enc(ref.slice(at + 1))}` : null;
}

// ---- routing and live updates ------------------------------------------------------

async function refreshCluster() {
  try {
    const [c, runs] = await Promise.all([getJson("/ui/api/cluster"), getJson("/ui/api/runs")]);
    state.connected = c.connected;
    state.nodes = c.nodes;
    state.runs = runs;
  } catch (e) {
    state.connected = false;
  }
}

async function route() {
  const decode = (p) => { try { return decodeURIComponent(p); } catch (_) { return p; } };
  const parts = (location.hash.replace(/^#\/?/, "") || "runs").split("/").map(decode);
  state.route = parts;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === parts[0]);
  switch (parts[0]) {
    case "nodes": return renderNodes();
    case "modules": return renderModules(parts[1], parts[2] || "latest");
    case "models": return renderModels(parts[1], parts[2] || "latest");
    case "actors": return renderActors();
    default: return renderRuns(parts[1]);
  }
}

function live() {
  const badge = document.getElementById("live");
  const source = new EventSource("/ui/events");
  source.onopen = () => { badge.textContent = "live"; badge.classList.add("on"); };
  source.onerror = () => { badge.textContent = "reconnecting"; badge.classList.remove("on"); };
  source.addEventListener("runs", (e) => {
    state.runs = JSON.parse(e.data);
    state.connected = true;
    if (state.route[0] === "runs" || !state.route[0]) route();
  });
  source.addEventListener("nodes", (e) => {
    state.nodes = JSON.parse(e.data);
    state.connected = true;
    if (state.route[0] === "nodes") route();
  });
}

window.addEventListener("hashchange", route);
refreshCluster().then(route).then(() => { document.body.dataset.ready = "true"; live(); });
