// The Espalier dashboard: runs (live), one run, compare runs, plugins, pipelines. A hash router
// picks the view; every view reads the public REST API (api.js) and the live views follow the
// daemon's event streams (GET /v1/events for the run list, GET /v1/runs/{id}/events for a run).
// Nothing here knows more than a script could.

import { get, change, askToken, ApiError } from "./api.js";
import { heatMap, bars, scatter, keptColour } from "./charts.js";

// ---------- small DOM helpers (text only: nothing from the daemon becomes markup) ----------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const view = () => document.getElementById("view");

function show(...nodes) {
  view().replaceChildren(...nodes);
}

function errorBox(e) {
  const kind = e instanceof ApiError ? ` (${e.kind})` : "";
  return h("p", { class: "error", role: "alert" }, String(e.message || e) + kind);
}

const pct = (v) => (v === undefined || v === null ? "—" : (v * 100).toFixed(1) + "%");
const num = (v, d = 2) => (v === undefined || v === null || !isFinite(v) ? "—" : Number(v).toFixed(d));
const short = (sha) => (sha ? sha.slice(0, 12) : "—");

function bytes(n) {
  if (n === undefined || n === null) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  seconds = Math.max(0, Math.round(seconds));
  const m = Math.floor(seconds / 60), s = seconds % 60;
  return m >= 60 ? `${Math.floor(m / 60)}h ${m % 60}m` : m ? `${m}m ${s}s` : `${s}s`;
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "interrupted"]);

// The event types of a run's stream (`RunEvent` in host/src/events.rs), and those that end it.
const ENDINGS = new Set(["run-finished", "run-failed", "run-cancelled", "run-interrupted"]);
const RUN_EVENTS = ["run-started", "notice", "warning", "stage-started", "stage-progress",
  "calibration-progress", "stage-finished", "finetune-started", "finetune-progress", "finetune-pruned", "finetune-mask-updated", "finetune-round", "finetune-finished",
  "evaluation-started", "evaluation-progress", "evaluation-finished", "exported", ...ENDINGS];

/** A table whose columns sort when their header is clicked (numbers as numbers). */
function sortableTable(id, columns, rows, initial) {
  // columns: [{key, label, value: row -> sortable, render: row -> node|string, num?}]
  let sortKey = initial || null, ascending = true;
  const tbody = h("tbody");
  const heads = columns.map((c) => h("th", { "data-sort": c.key, scope: "col", tabindex: 0,
    onclick: () => { ascending = sortKey === c.key ? !ascending : true; sortKey = c.key; draw(); } }, c.label));
  function draw() {
    const sorted = [...rows];
    if (sortKey) {
      const col = columns.find((c) => c.key === sortKey);
      sorted.sort((a, b) => {
        const x = col.value(a), y = col.value(b);
        const r = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return ascending ? r : -r;
      });
    }
    heads.forEach((th, i) => th.setAttribute("aria-sort", columns[i].key === sortKey ? (ascending ? "ascending" : "descending") : "none"));
    tbody.replaceChildren(...sorted.map((r) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : "" }, c.render(r))))));
  }
  draw();
  return h("table", { id }, h("thead", {}, h("tr", {}, heads)), tbody);
}

// ---------- the daemon-wide event feed ----------

const feedListeners = new Set();
let feed = null;

function openFeed() {
  const state = document.getElementById("feed-state");
  feed = new EventSource("/v1/events");
  feed.addEventListener("hello", () => { state.textContent = "live"; state.className = "ok"; });
  feed.onerror = () => { state.textContent = "reconnecting…"; state.className = "muted"; };
  feed.onmessage = null;
  for (const t of ["run-queued", ...RUN_EVENTS, "resync"]) {
    feed.addEventListener(t, (e) => {
      let data = {};
      try { data = JSON.parse(e.data); } catch (_) { return; }
      for (const f of feedListeners) f(t, data);
    });
  }
}

// ---------- runs ----------

/** What the event stream tells about a running run beyond its record. */
class LiveInfo {
  constructor() { this.total = 0; this.index = 0; this.sub = 0; this.step = ""; }
}

function progressOf(record, live) {
  if (record.status === "succeeded") return 1;
  if (!live || !live.total) return record.progress || 0;
  return Math.min(1, (live.index + live.sub) / live.total);
}

function elapsedOf(record) {
  if (!record.started_at) return null;
  const end = record.finished_at ? Date.parse(record.finished_at) : Date.now();
  return (end - Date.parse(record.started_at)) / 1000;
}

function etaOf(record, live) {
  if (record.status !== "running") return null;
  const p = progressOf(record, live), t = elapsedOf(record);
  if (t === null || p < 0.02) return null;
  return t * (1 - p) / p;
}

function stageText(record, live) {
  const stage = record.current_stage || "";
  if (record.status !== "running" || !live || !live.step) return stage || "—";
  return stage ? `${stage}: ${live.step}` : live.step;
}

async function runsView() {
  const status = h("select", { id: "filter-status", "aria-label": "Status" },
    ["", "queued", "running", "succeeded", "failed", "cancelled", "interrupted"].map((s) => h("option", { value: s }, s || "any status")));
  const pipeline = h("input", { id: "filter-pipeline", placeholder: "pipeline name", "aria-label": "Pipeline" });
  const message = h("div");
  const tbody = h("tbody");
  const table = h("table", { id: "runs" },
    h("thead", {}, h("tr", {}, ["Run", "Pipeline", "Status", "Stage", "Progress", "Elapsed", "ETA", "Perplexity (dense → pruned)", "Kept"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  show(h("h1", {}, "Runs"), h("div", { class: "filters" }, status, pipeline), message, table);

  const records = new Map();
  const live = new Map();
  const rows = new Map();

  function matches(r) {
    return (!status.value || r.status === status.value) &&
      (!pipeline.value.trim() || r.pipeline_name.includes(pipeline.value.trim()));
  }

  function rowFor(r) {
    const info = live.get(r.id);
    const p = progressOf(r, info);
    const m = r.metrics || {};
    const ppl = m.perplexity_dense != null ? `${num(m.perplexity_dense)} → ${num(m.perplexity_pruned)}` : "—";
    const bar = h("progress", { max: 1, value: p, "aria-label": `progress ${(p * 100).toFixed(0)}%` });
    const err = r.error ? h("div", { class: "error small" }, r.error.message) : null;
    return h("tr", { "data-run": r.id, "data-status": r.status },
      h("td", {}, h("a", { href: `#/runs/${r.id}` }, "#" + r.id)),
      h("td", {}, r.pipeline_name),
      h("td", { class: "status status-" + r.status }, r.status),
      h("td", { class: "stage" }, stageText(r, info), err),
      h("td", { class: "progress" }, bar, h("span", { class: "small" }, " " + (p * 100).toFixed(0) + "%")),
      h("td", { class: "elapsed num" }, duration(elapsedOf(r))),
      h("td", { class: "eta num" }, duration(etaOf(r, info))),
      h("td", { class: "num" }, ppl),
      h("td", { class: "num" }, pct(m.block_linear_density)));
  }

  function draw() {
    const sorted = [...records.values()].filter(matches).sort((a, b) => b.id - a.id);
    tbody.replaceChildren(...sorted.map((r) => { const row = rowFor(r); rows.set(r.id, row); return row; }));
    if (!sorted.length) tbody.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No runs match.")));
  }

  function redrawRow(id) {
    const r = records.get(id);
    const old = rows.get(id);
    if (!r || !old || !old.isConnected) return draw();
    const row = rowFor(r);
    rows.set(id, row);
    old.replaceWith(row);
  }

  // One read of a run's record at a time; an event during a read asks for one more, so a read
  // that started before the event cannot leave an older record on the page.
  const refetching = new Map();
  async function refetch(id) {
    if (refetching.has(id)) { refetching.set(id, true); return; }
    do {
      refetching.set(id, false);
      try { records.set(id, await get(`/v1/runs/${id}`)); } catch (_) { /* gone: leave it */ }
    } while (refetching.get(id));
    refetching.delete(id);
    draw();
  }

  async function reload() {
    try {
      const list = await get("/v1/runs?limit=200");
      records.clear();
      for (const r of list) records.set(r.id, r);
      message.replaceChildren();
      draw();
    } catch (e) { message.replaceChildren(errorBox(e)); }
  }

  const onEvent = (type, data) => {
    if (type === "resync") return reload();
    const id = data.run, e = data.event || {};
    if (type === "run-queued") { records.set(id, e); return draw(); }
    let info = live.get(id);
    if (!info) { info = new LiveInfo(); live.set(id, info); }
    switch (type) {
      case "run-started": info.total = e.stages || 0; info.step = "planning done"; return refetch(id);
      case "stage-started": info.total = e.total; info.index = e.index; info.sub = 0; info.step = "";
        if (records.has(id)) { records.get(id).current_stage = e.name; records.get(id).status = "running"; }
        return refetch(id);
      case "stage-progress": info.step = e.step; if (e.total) info.sub = Math.min(0.99, e.done / e.total); break;
      case "calibration-progress": info.step = `${e.pass} ${e.done}/${e.total}`; info.sub = Math.min(0.99, e.done / Math.max(1, e.total)) * 0.5; break;
      case "stage-finished": info.index = e.index + 1; info.sub = 0; info.step = ""; return refetch(id);
      case "finetune-started": info.step = `fine-tuning: ${e.steps} steps`; break;
      case "finetune-progress": info.step = `fine-tuning ${e.step}/${e.steps}, loss ${Number(e.loss).toFixed(4)}`; break;
      case "finetune-pruned": info.step = `${e.stage} pruned after step ${e.step}: density ${Number(e.density).toFixed(4)}`; break;
      case "finetune-mask-updated": info.step = `${e.stage} swapped ${e.grown} weights after step ${e.step}`; break;
      case "finetune-round": info.step = `lottery round ${e.round}/${e.rounds} done at density ${Number(e.density).toFixed(4)}` + (e.pruned_to == null ? "" : `, pruned to ${Number(e.pruned_to).toFixed(4)}`); break;
      case "evaluation-started": info.step = `evaluating ${e.which}`; break;
      case "evaluation-progress": info.step = `evaluating ${e.which} ${e.windows_done}/${e.windows_total}`; break;
      case "exported": info.step = "exported"; break;
      default:
        if (ENDINGS.has(type)) { live.delete(id); return refetch(id); }
        break;
    }
    if (!records.has(id)) return refetch(id);
    redrawRow(id);
  };
  feedListeners.add(onEvent);
  status.addEventListener("change", draw);
  pipeline.addEventListener("input", draw);
  // Elapsed and ETA tick between events.
  const ticker = setInterval(() => {
    for (const [id, r] of records) if (r.status === "running") redrawRow(id);
  }, 1000);
  await reload();
  return () => { feedListeners.delete(onEvent); clearInterval(ticker); };
}

// ---------- one run ----------

function heatCells(report) {
  const sums = new Map(), blocks = new Set(), roles = [];
  for (const l of report.layers) {
    if (l.block === null || l.block === undefined) continue;
    blocks.add(l.block);
    if (!roles.includes(l.role)) roles.push(l.role);
    const key = l.block + "|" + l.role;
    const s = sums.get(key) || { kept: 0, total: 0, names: [] };
    s.kept += l.kept; s.total += l.original_numel; s.names.push(l.name);
    sums.set(key, s);
  }
  const order = ["attn-q", "attn-k", "attn-v", "attn-qkv", "attn-o", "mlp-gate", "mlp-up", "mlp-down"];
  roles.sort((a, b) => (order.indexOf(a) + 99) % 99 - (order.indexOf(b) + 99) % 99 || a.localeCompare(b));
  const cells = new Map();
  for (const [key, s] of sums) {
    const value = s.total ? s.kept / s.total : 1;
    const [b, r] = key.split("|");
    cells.set(key, { value, title: `block ${b} · ${r}: ${(value * 100).toFixed(1)}% kept (${s.kept} of ${s.total}) — ${s.names.join(", ")}` });
  }
  return { blocks: [...blocks].sort((a, b) => a - b), roles, cells };
}

function evaluationTable(evaluation) {
  const d = evaluation.dense, p = evaluation.pruned;
  const rows = [
    ["Perplexity", (e) => e.perplexity && e.perplexity.perplexity, 3, false],
    ["Eval tokens/s", (e) => e.perplexity && e.perplexity.tokens_per_second, 1, true],
    ["Prefill tokens/s", (e) => e.latency && e.latency.prefill_tokens_per_s, 1, true],
    ["Decode ms/token", (e) => e.latency && e.latency.ms_per_token, 2, false],
    ["Decode tokens/s", (e) => e.latency && e.latency.decode_tokens_per_s, 1, true],
  ];
  const body = rows.map(([name, f, digits]) => {
    const a = f(d), b = f(p);
    const ratio = a && b ? (b / a).toFixed(2) + "×" : "—";
    return h("tr", {}, h("th", { scope: "row" }, name), h("td", { class: "num" }, num(a, digits)), h("td", { class: "num" }, num(b, digits)), h("td", { class: "num" }, ratio));
  });
  body.push(h("tr", {}, h("th", { scope: "row" }, "Weights held"), h("td", { class: "num" }, bytes(d.memory && d.memory.weight_bytes)), h("td", { class: "num" }, bytes(p.memory && p.memory.weight_bytes)),
    h("td", { class: "num" }, d.memory && p.memory ? (p.memory.weight_bytes / d.memory.weight_bytes).toFixed(2) + "×" : "—")));
  body.push(h("tr", {}, h("th", { scope: "row" }, p.memory && p.memory.per_model_peak ? "Peak RSS" : "Peak RSS (process-wide)"), h("td", { class: "num" }, bytes(d.memory && d.memory.peak_rss_bytes)), h("td", { class: "num" }, bytes(p.memory && p.memory.peak_rss_bytes)), h("td", {}, "")));
  const proto = p.protocol || {};
  return h("div", {},
    h("p", { class: "small muted" }, `Protocol: ${proto.text || "?"} (sha256 ${short(proto.text_sha256)}), window ${proto.window}, stride ${proto.stride}, ${proto.max_tokens || "all"} tokens; latency ${proto.prompt_tokens || "—"}-token prompt, ${proto.new_tokens || "—"} new tokens` + (evaluation.dense_shared ? "; dense taken from an earlier run in the same process" : "")),
    h("table", { id: "evaluation" }, h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", { scope: "col" }, "Dense"), h("th", { scope: "col" }, "Pruned"), h("th", { scope: "col" }, "Pruned ÷ dense"))), h("tbody", {}, body)),
    kernelList(p.kernels));
}

function kernelList(k) {
  if (!k) return null;
  const layers = Object.entries(k.layers || {}).map(([kind, n]) => `${n} on ${kind}`).join(", ");
  const reasons = Object.entries(k.dense_because || {});
  return h("div", { class: "small" }, h("p", {}, "Pruned model's linears: " + (layers || "—")),
    reasons.length ? h("ul", {}, reasons.map(([why, n]) => h("li", {}, `${n} dense: ${why}`))) : null);
}

async function runView(id) {
  const head = h("div");
  const body = h("div");
  show(head, body);
  let record;
  try { record = await get(`/v1/runs/${id}`); } catch (e) { return show(h("h1", {}, `Run #${id}`), errorBox(e)); }

  const cancelArea = h("span");
  const log = h("ol", { id: "event-log", class: "small log" });
  const statusEl = h("span", { id: "run-status", class: "status status-" + record.status }, record.status);
  const stageEl = h("span", { id: "run-stage" }, record.current_stage || "");
  const bar = h("progress", { id: "run-progress", max: 1, value: progressOf(record) });
  const msg = h("div");

  function drawCancel() {
    if (TERMINAL.has(record.status)) return cancelArea.replaceChildren();
    const ask = h("button", { id: "cancel", type: "button", class: "danger" }, "Cancel run");
    ask.addEventListener("click", () => {
      const yes = h("button", { id: "cancel-confirm", type: "button", class: "danger" }, "Yes, cancel it");
      const no = h("button", { type: "button", onclick: drawCancel }, "Keep running");
      yes.addEventListener("click", async () => {
        yes.disabled = true;
        try { record = await change("POST", `/v1/runs/${id}/cancel`, {}); msg.replaceChildren(h("p", {}, "Cancelling…")); }
        catch (e) { msg.replaceChildren(errorBox(e)); }
        drawCancel();
      });
      cancelArea.replaceChildren(h("span", {}, "Cancel run #" + id + "? "), yes, no);
    });
    cancelArea.replaceChildren(ask);
  }

  head.replaceChildren(
    h("h1", {}, `Run #${id} · ${record.pipeline_name}`),
    h("p", {}, "Status: ", statusEl, " · stage: ", stageEl, " ", bar, " ", cancelArea),
    h("p", { class: "small muted" }, `model ${record.model}` +
      Object.entries(record.overrides || {}).filter(([, v]) => v !== null).map(([k, v]) => ` · override ${k} = ${v}`).join("") +
      ` · created ${record.created_at}` + (record.started_at ? ` · started ${record.started_at}` : "") + (record.finished_at ? ` · finished ${record.finished_at} (${duration(elapsedOf(record))})` : "")),
    record.error ? h("p", { class: "error" }, `${record.error.kind}: ${record.error.message}`) : "",
    msg);
  drawCancel();

  let source = null;
  if (!TERMINAL.has(record.status)) {
    const info = new LiveInfo();
    source = new EventSource(`/v1/runs/${id}/events`);
    const handle = (type) => (e) => {
      let ev = {};
      try { ev = JSON.parse(e.data); } catch (_) { return; }
      log.append(h("li", {}, `${type}` + (ev.name ? ` ${ev.name}` : "") + (ev.step ? `: ${ev.step}` : "") + (ev.message ? `: ${ev.message}` : "")));
      if (type === "stage-started") { info.total = ev.total; info.index = ev.index; info.sub = 0; stageEl.textContent = ev.name; statusEl.textContent = "running"; }
      if (type === "stage-progress" && ev.total) info.sub = Math.min(0.99, ev.done / ev.total);
      if (type === "stage-finished") { info.index = ev.index + 1; info.sub = 0; }
      bar.value = progressOf(record, info);
      if (ENDINGS.has(type)) {
        source.close();
        // The record is final before its terminal event is sent: draw the finished run.
        setTimeout(() => route(), 50);
      }
    };
    for (const t of RUN_EVENTS) {
      source.addEventListener(t, handle(t));
    }
  }

  const sections = [];
  sections.push(h("h2", {}, "Plugins used"), h("table", { id: "plugins-used" },
    h("thead", {}, h("tr", {}, h("th", {}, "Plugin"), h("th", {}, "sha256"))),
    h("tbody", {}, Object.entries(record.plugins || {}).map(([n, sha]) => h("tr", {}, h("td", {}, n), h("td", { class: "mono" }, sha))))));

  if (record.report_path) {
    let report;
    try { report = await get(`/v1/runs/${id}/report`); } catch (e) { sections.push(errorBox(e)); }
    if (report) sections.unshift(...reportSections(id, record, report));
  } else if (!TERMINAL.has(record.status)) {
    sections.unshift(h("h2", {}, "Events"), log);
  }
  sections.push(h("h2", {}, "Pipeline"), h("pre", { id: "pipeline-text" }, record.pipeline_text));
  body.replaceChildren(...sections);
  return () => { if (source) source.close(); };
}

function reportSections(id, record, report) {
  const out = [];
  const s = report.summary;
  out.push(h("p", { class: "links" },
    h("a", { id: "download-report", href: `/v1/runs/${id}/report`, download: `run-${id}-report.json` }, "Download report.json"),
    report.export_dir ? [" · ", h("a", { id: "download-masks", href: `/v1/runs/${id}/masks` }, "Download masks.safetensors")] : null,
    ` · kept ${pct(s.block_linear_density)} of block linears, ${pct(s.all_weights_density)} of all weights; ${s.nonzero_parameters_after} of ${s.parameters_before} parameters non-zero`));
  if (report.evaluation) out.push(h("h2", {}, "Dense vs pruned"), evaluationTable(report.evaluation));

  out.push(h("h2", {}, "Stages"), h("table", { id: "stages" },
    h("thead", {}, h("tr", {}, ["Stage", "Plugin", "sha256", "Produces", "Targets", "Density asked", "Density after", "Time", "Sandbox share"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, report.stages.map((st) => h("tr", {},
      h("td", {}, st.name), h("td", {}, `${st.plugin} ${st.plugin_version}`), h("td", { class: "mono", title: st.plugin_sha256 }, short(st.plugin_sha256)),
      h("td", {}, st.produces), h("td", { class: "num" }, st.targets), h("td", { class: "num" }, st.density_from || pct(st.requested_density)),
      h("td", { class: "num" }, pct(st.density_after)), h("td", { class: "num" }, num(st.seconds, 3) + " s"),
      h("td", { class: "num", title: "guest + boundary + instantiation, as a share of the stage's time" }, pct(st.guest_share)))))));

  const { blocks, roles, cells } = heatCells(report);
  if (blocks.length) {
    out.push(h("h2", {}, "Kept fraction per block and role"),
      h("p", { class: "small muted" }, "Each cell: kept ÷ original weights of that block's layer of that role (hover for the layer names)."),
      h("div", { class: "scroll" }, heatMap("heatmap", blocks, roles, cells)),
      h("p", { class: "legend small" }, "Scale: ", [0, 0.25, 0.5, 0.75, 1].map((v) => {
        const swatch = h("span", { class: "swatch" + (v > 0.55 ? " dark" : "") }, pct(v));
        swatch.style.background = keptColour(v);
        return swatch;
      })));
  }

  for (const st of report.stages) {
    const entries = Object.entries(st.budgets || {});
    if (!entries.length) continue;
    const order = new Map(report.layers.map((l, i) => [l.name, i]));
    entries.sort((a, b) => (order.get(a[0]) ?? 0) - (order.get(b[0]) ?? 0));
    out.push(h("h2", {}, `Budgets from stage “${st.name}”`),
      h("div", { class: "scroll tall" }, bars("budgets-" + st.name.replace(/[^a-zA-Z0-9_-]/g, "_"), entries.map(([name, v]) => ({ label: name, value: v, title: `${name}: ${(v * 100).toFixed(2)}% kept` })))));
  }

  out.push(h("h2", {}, "Layers"), h("p", { class: "small muted" }, "Click a column to sort."),
    h("div", { class: "scroll tall" }, sortableTable("layers", [
      { key: "name", label: "Layer", value: (l) => l.name, render: (l) => l.name },
      { key: "block", label: "Block", value: (l) => l.block ?? -1, render: (l) => l.block ?? "—", num: true },
      { key: "role", label: "Role", value: (l) => l.role, render: (l) => l.role },
      { key: "shape", label: "Shape", value: (l) => l.shape.reduce((a, b) => a * b, 1), render: (l) => l.shape.join("×"), num: true },
      { key: "kept", label: "Kept", value: (l) => l.kept, render: (l) => l.kept, num: true },
      { key: "density", label: "Density", value: (l) => l.density, render: (l) => pct(l.density), num: true },
      { key: "structure", label: "Structure", value: (l) => l.structure || "", render: (l) => l.structure || "—" },
    ], report.layers)));
  return out;
}

// ---------- compare ----------

async function compareView(query) {
  const message = h("div");
  show(h("h1", {}, "Compare runs"), message);
  let runs;
  try { runs = await get("/v1/runs?status=succeeded&limit=200"); } catch (e) { return message.replaceChildren(errorBox(e)); }
  const wanted = new Set((query.get("ids") || "").split(",").filter(Boolean).map(Number));
  if (!wanted.size) runs.slice(0, 12).forEach((r) => wanted.add(r.id));
  const charts = h("div", { class: "charts" });
  const table = h("div");
  const picker = h("fieldset", { id: "compare-picker" }, h("legend", {}, "Runs (succeeded)"),
    runs.length ? runs.map((r) => h("label", { class: "pick" },
      h("input", { type: "checkbox", "data-compare": r.id, checked: wanted.has(r.id), onchange: redraw }),
      ` #${r.id} ${r.pipeline_name}`)) : h("p", { class: "muted" }, "No finished runs yet."));
  view().append(picker, charts, table);
  const reports = new Map();

  async function redraw() {
    const ids = [...picker.querySelectorAll("input[data-compare]")].filter((i) => i.checked).map((i) => Number(i.dataset.compare));
    history.replaceState(null, "", `#/compare?ids=${ids.join(",")}`);
    for (const id of ids) {
      if (!reports.has(id)) {
        try { reports.set(id, await get(`/v1/runs/${id}/report`)); } catch (e) { reports.set(id, null); }
      }
    }
    const points = ids.map((id) => ({ id, r: reports.get(id), run: runs.find((x) => x.id === id) })).filter((p) => p.r);
    const ppl = points.filter((p) => p.r.evaluation && p.r.evaluation.pruned.perplexity)
      .map((p) => ({ run: p.id, label: `#${p.id} ${p.r.pipeline}`, x: p.r.summary.block_linear_density, y: p.r.evaluation.pruned.perplexity.perplexity }));
    const ms = points.filter((p) => p.r.evaluation && p.r.evaluation.pruned.latency)
      .map((p) => ({ run: p.id, label: `#${p.id} ${p.r.pipeline}`, x: p.r.summary.block_linear_density, y: p.r.evaluation.pruned.latency.ms_per_token }));
    charts.replaceChildren(
      h("figure", {}, scatter("ppl-vs-density", ppl, "kept fraction", "perplexity"), h("figcaption", {}, "Pruned perplexity against kept fraction (one point per run)")),
      h("figure", {}, scatter("ms-vs-density", ms, "kept fraction", "ms/token"), h("figcaption", {}, "Decode ms/token against kept fraction (one point per run)")));
    table.replaceChildren(h("table", { id: "compare-table" },
      h("thead", {}, h("tr", {}, ["Run", "Pipeline", "Model", "Kept", "Perplexity dense", "Perplexity pruned", "ms/token dense", "ms/token pruned"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, points.map((p) => {
        const e = p.r.evaluation;
        return h("tr", { "data-run": p.id }, h("td", {}, h("a", { href: `#/runs/${p.id}` }, "#" + p.id)), h("td", {}, p.r.pipeline), h("td", {}, p.r.model),
          h("td", { class: "num" }, pct(p.r.summary.block_linear_density)),
          h("td", { class: "num" }, num(e && e.dense.perplexity && e.dense.perplexity.perplexity, 3)),
          h("td", { class: "num" }, num(e && e.pruned.perplexity && e.pruned.perplexity.perplexity, 3)),
          h("td", { class: "num" }, num(e && e.dense.latency && e.dense.latency.ms_per_token)),
          h("td", { class: "num" }, num(e && e.pruned.latency && e.pruned.latency.ms_per_token)));
      }))));
  }
  await redraw();
}

// ---------- plugins ----------

async function pluginsView() {
  const message = h("div", { id: "upload-result" });
  const list = h("div");
  const input = h("input", { id: "upload-file", type: "file", accept: ".wasm,application/wasm" });
  const replace = h("input", { id: "upload-replace", type: "checkbox" });
  const drop = h("div", { id: "dropzone", class: "dropzone", tabindex: 0 },
    h("p", {}, "Drop a plugin (.wasm component) here, or "), h("label", {}, "choose a file: ", input),
    h("label", { class: "small" }, replace, " replace a different plugin of the same name"));
  show(h("h1", {}, "Plugins"), drop, message, list);

  async function upload(file) {
    message.replaceChildren(h("p", {}, `Uploading ${file.name} (${bytes(file.size)})…`));
    try {
      const buf = await file.arrayBuffer();
      const p = await change("POST", "/v1/plugins" + (replace.checked ? "?replace=true" : ""), buf, "application/wasm");
      message.replaceChildren(h("p", { class: "ok" }, `Registered ${p.name} ${p.version} (sha256 ${short(p.sha256)})`));
      await reload();
    } catch (e) { message.replaceChildren(errorBox(e)); }
  }
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });

  async function reload() {
    let data;
    try { data = await get("/v1/plugins"); } catch (e) { return list.replaceChildren(errorBox(e)); }
    const rows = data.plugins.map((p) => h("tr", { "data-plugin": p.name },
      h("td", {}, h("strong", {}, p.name), h("div", { class: "small muted" }, p.description)),
      h("td", {}, p.version), h("td", {}, p.source), h("td", { class: "mono", title: p.sha256 }, short(p.sha256)),
      h("td", { class: "num" }, bytes(p.size_bytes)),
      h("td", { class: "signer" }, "signer" in p ? (p.signer || "unsigned") : "—"),
      h("td", {}, p.wit), h("td", {}, p.produces),
      h("td", {}, p.params.length ? h("ul", { class: "params" }, p.params.map((q) => h("li", {}, h("code", {}, `${q.name} = ${JSON.stringify(q.default)}`), ` (${q.type}) ${q.doc}`))) : "—")));
    list.replaceChildren(
      h("table", { id: "plugins" }, h("thead", {}, h("tr", {}, ["Plugin", "Version", "Source", "sha256", "Size", "Signer", "WIT", "Produces", "Parameters (describe)"].map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, rows)),
      h("h2", {}, "Files that failed to load"),
      data.rejected.length ? h("table", { id: "rejected" }, h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", {}, "Why"))),
        h("tbody", {}, data.rejected.map((r) => h("tr", {}, h("td", { class: "mono" }, r.file), h("td", { class: "error" }, r.reason)))))
        : h("p", { id: "rejected", class: "muted" }, "None."));
  }
  await reload();
}

// ---------- pipelines ----------

async function pipelinesView() {
  const list = h("div");
  show(h("h1", {}, "Pipelines"), h("p", { class: "small muted" }, "Files of the daemon's pipeline folder; edit them there."), list);
  let data;
  try { data = await get("/v1/pipelines"); } catch (e) { return list.replaceChildren(errorBox(e)); }
  list.replaceChildren(h("table", { id: "pipelines" },
    h("thead", {}, h("tr", {}, ["Pipeline", "State", "sha256"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, data.map((p) => h("tr", { "data-pipeline": p.name },
      h("td", {}, h("a", { href: `#/pipelines/${encodeURIComponent(p.name)}` }, p.name)),
      h("td", { class: p.error ? "error" : "ok" }, p.error ? "cannot run: " + p.error : "ready"),
      h("td", { class: "mono", title: p.sha256 }, short(p.sha256)))))));
}

/** The line an error names (`file:LINE:COL: ...`), if any. */
function errorLine(error, file) {
  if (!error) return null;
  const base = file.split("/").pop();
  const m = error.match(/([^\s:]+\.toml):(\d+)(?::(\d+))?/);
  if (!m || !m[1].endsWith(base)) return m ? Number(m[2]) : null;
  return Number(m[2]);
}

async function pipelineView(name) {
  let p;
  try { p = await get(`/v1/pipelines/${encodeURIComponent(name)}`); } catch (e) { return show(h("h1", {}, name), errorBox(e)); }
  const bad = errorLine(p.error, p.file);
  const lines = p.text.replace(/\n$/, "").split("\n");
  const source = h("pre", { id: "pipeline-source", class: "numbered" }, lines.map((text, i) =>
    h("span", { class: "line" + (i + 1 === bad ? " error-line" : ""), "data-line": i + 1, id: i + 1 === bad ? "error-line" : null },
      h("span", { class: "ln", "aria-hidden": "true" }, String(i + 1).padStart(3, " ") + "  "), text,
      i + 1 === bad ? h("span", { class: "mark" }, "   ◀ the error is here") : null)));
  const message = h("div");
  const model = h("input", { id: "override-model", placeholder: "model (e.g. builtin:tiny-llama, models/NAME)" });
  const density = h("input", { id: "override-density", type: "number", min: 0, max: 1, step: "any", placeholder: "density 0..1" });
  const start = h("button", { id: "start-run", type: "submit", disabled: !!p.error }, "Start run");
  const form = h("form", { id: "run-form", class: "row" }, h("label", {}, "Model ", model), h("label", {}, "Density ", density), start);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const overrides = {};
    if (model.value.trim()) overrides.model = model.value.trim();
    if (density.value !== "") overrides.density = Number(density.value);
    start.disabled = true;
    try {
      const run = await change("POST", "/v1/runs", { pipeline: p.name, overrides });
      location.hash = `#/runs/${run.id}`;
    } catch (err) { message.replaceChildren(errorBox(err)); start.disabled = false; }
  });
  show(h("h1", {}, `Pipeline ${p.name}`), h("p", { class: "small muted mono" }, `${p.file} · sha256 ${p.sha256}`),
    p.error ? h("p", { id: "pipeline-error", class: "error", role: "alert" }, (bad ? `Line ${bad}: ` : "") + p.error) : null,
    h("h2", {}, "Run it"), form, message, h("h2", {}, "Source"), source);
  const marked = document.getElementById("error-line");
  if (marked) marked.scrollIntoView({ block: "center" });
}

// ---------- router ----------

let teardown = null;

async function route() {
  if (typeof teardown === "function") teardown();
  teardown = null;
  // Tests and scripts wait for data-view to name the view once it is drawn.
  document.body.dataset.view = "loading";
  const [path, q] = (location.hash.replace(/^#/, "") || "/runs").split("?");
  const query = new URLSearchParams(q || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === parts[0]));
  try {
    if (parts[0] === "runs" && parts[1]) teardown = await runView(Number(parts[1]));
    else if (parts[0] === "compare") teardown = await compareView(query);
    else if (parts[0] === "plugins") teardown = await pluginsView();
    else if (parts[0] === "pipelines" && parts[1]) teardown = await pipelineView(decodeURIComponent(parts[1]));
    else if (parts[0] === "pipelines") teardown = await pipelinesView();
    else teardown = await runsView();
  } catch (e) { show(errorBox(e)); }
  document.body.dataset.view = parts.join("/") || "runs";
}

window.addEventListener("hashchange", route);
document.getElementById("token-button").addEventListener("click", () => askToken());
openFeed();
route();
