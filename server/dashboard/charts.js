// Small SVG charts drawn from report data: a heat map (blocks x roles), horizontal bars and a
// scatter plot. Every mark carries its value as text (in the cell, at the bar, in a tooltip
// <title>) so nothing is read from colour alone; the same numbers are in the tables beside.

const NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c);
  return el;
}

function title(text) {
  const t = svg("title");
  t.textContent = text;
  return t;
}

function label(x, y, text, attrs = {}) {
  const t = svg("text", { x, y, ...attrs });
  t.textContent = text;
  return t;
}

/** Kept fraction 0..1 -> a fill from pale (little kept) to deep green (all kept). */
export function keptColour(v) {
  const t = Math.max(0, Math.min(1, v));
  const light = 96 - t * 66; // lightness 96% .. 30%
  return `hsl(140, 45%, ${light}%)`;
}

/**
 * Heat map of `cells` (Map "block|role" -> {value, title}) with one row per block and one column
 * per role. Each cell is a <rect data-block data-role data-value> with its percentage inside.
 */
export function heatMap(id, blocks, roles, cells) {
  const cw = 64, ch = 20, left = 56, top = 24;
  const width = left + roles.length * cw + 4;
  const height = top + blocks.length * ch + 4;
  const root = svg("svg", { id, viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "Kept fraction per block and layer role" });
  roles.forEach((r, j) => root.append(label(left + j * cw + cw / 2, top - 8, r, { class: "axis", "text-anchor": "middle" })));
  blocks.forEach((b, i) => {
    root.append(label(left - 6, top + i * ch + ch / 2 + 4, "block " + b, { class: "axis", "text-anchor": "end" }));
    roles.forEach((r, j) => {
      const cell = cells.get(b + "|" + r);
      if (!cell) return;
      const x = left + j * cw, y = top + i * ch;
      const rect = svg("rect", { x, y, width: cw - 2, height: ch - 2, fill: keptColour(cell.value),
        "data-block": b, "data-role": r, "data-value": cell.value.toFixed(6), class: "cell" },
        title(cell.title));
      const dark = cell.value > 0.55;
      const text = label(x + (cw - 2) / 2, y + ch / 2 + 3, (cell.value * 100).toFixed(1) + "%",
        { class: dark ? "cell-text dark" : "cell-text", "text-anchor": "middle" });
      text.append(title(cell.title));
      root.append(rect, text);
    });
  });
  return root;
}

/** Horizontal bars: items [{label, value (0..1), title}] in the given order. */
export function bars(id, items) {
  const rowH = 14, left = 300, barW = 260, width = left + barW + 60;
  const height = items.length * rowH + 8;
  const root = svg("svg", { id, viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  items.forEach((it, i) => {
    const y = 4 + i * rowH;
    root.append(label(left - 6, y + 10, it.label, { class: "axis", "text-anchor": "end" }));
    const bar = svg("rect", { x: left, y: y + 1, width: Math.max(1, it.value * barW), height: rowH - 3,
      class: "bar", "data-label": it.label, "data-value": it.value.toFixed(6) }, title(it.title));
    root.append(bar, label(left + it.value * barW + 4, y + 10, (it.value * 100).toFixed(1) + "%", { class: "axis" }));
  });
  return root;
}

function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const step = (hi - lo) / n;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

function fmt(v) {
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

/** Scatter plot: points [{x, y, label, run}], axes named; one <circle data-run> per point. */
export function scatter(id, points, xName, yName) {
  const width = 420, height = 300, left = 56, right = 16, top = 16, bottom = 44;
  const root = svg("svg", { id, viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": `${yName} against ${xName}` });
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  let [x0, x1] = [Math.min(0, ...xs), Math.max(1, ...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (!points.length) { y0 = 0; y1 = 1; }
  if (y1 - y0 < 1e-9) { y0 -= Math.abs(y0) * 0.1 + 1; y1 += Math.abs(y1) * 0.1 + 1; }
  const pad = (y1 - y0) * 0.08;
  y0 = Math.max(0, y0 - pad); y1 += pad;
  const X = (v) => left + (v - x0) / (x1 - x0) * (width - left - right);
  const Y = (v) => height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom);
  root.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis-line" }));
  root.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis-line" }));
  for (const t of ticks(x0, x1, 5)) root.append(label(X(t), height - bottom + 14, (t * 100).toFixed(0) + "%", { class: "axis", "text-anchor": "middle" }));
  for (const t of ticks(y0, y1, 4)) root.append(label(left - 4, Y(t) + 3, fmt(t), { class: "axis", "text-anchor": "end" }));
  root.append(label((left + width - right) / 2, height - 8, xName, { class: "axis", "text-anchor": "middle" }));
  root.append(label(12, (top + height - bottom) / 2, yName, { class: "axis", "text-anchor": "middle", transform: `rotate(-90 12 ${(top + height - bottom) / 2})` }));
  for (const p of points) {
    const tip = `${p.label}: ${xName} ${(p.x * 100).toFixed(1)}%, ${yName} ${fmt(p.y)}`;
    root.append(svg("circle", { cx: X(p.x), cy: Y(p.y), r: 5, class: "point", "data-run": p.run }, title(tip)));
    root.append(label(X(p.x) + 7, Y(p.y) - 6, "#" + p.run, { class: "axis" }));
  }
  return root;
}
