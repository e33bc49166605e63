// Inline SVG charts drawn by the dashboard itself: every series is named in a legend, drawn with its own dash
// pattern and marker, and its last value is written out, so a chart reads without colour.

const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmt(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Math.abs(value) >= 100 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(2);
}

const MARKERS = ["circle", "square", "triangle"];

function marker(kind, x, y, cls) {
  if (kind === "square") return s("rect", { x: x - 3, y: y - 3, width: 6, height: 6, class: cls });
  if (kind === "triangle") return s("path", { d: `M${x},${y - 4} L${x + 4},${y + 3} L${x - 4},${y + 3} Z`, class: cls });
  return s("circle", { cx: x, cy: y, r: 3, class: cls });
}

/** A line chart: `series` [{name, values}] over `labels` (x axis, e.g. times); null values leave a gap. */
export function lineChart({ title, unit = "", labels, series, width = 440, height = 200 }) {
  const pad = { left: 48, right: 12, top: 28, bottom: 40 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const all = series.flatMap((x) => x.values).filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  const max = all.length ? Math.max(...all, 0) : 1;
  const top = max > 0 ? max * 1.1 : 1;
  const n = labels.length;
  const xAt = (i) => pad.left + (n <= 1 ? w / 2 : (i * w) / (n - 1));
  const yAt = (v) => pad.top + h - (v / top) * h;
  const svg = s("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  svg.append(s("text", { x: pad.left, y: 14, "font-weight": "bold" }, `${title}${unit ? ` (${unit})` : ""}`));
  for (const frac of [0, 0.5, 1]) {
    const y = pad.top + h - frac * h;
    svg.append(s("line", { x1: pad.left, x2: pad.left + w, y1: y, y2: y, class: frac ? "grid" : "axis" }));
    svg.append(s("text", { x: pad.left - 4, y: y + 4, "text-anchor": "end" }, fmt(frac * top)));
  }
  if (n) {
    svg.append(s("text", { x: pad.left, y: height - 22 }, labels[0]));
    if (n > 1) svg.append(s("text", { x: pad.left + w, y: height - 22, "text-anchor": "end" }, labels[n - 1]));
  }
  if (!all.length) {
    svg.append(s("text", { x: pad.left + w / 2, y: pad.top + h / 2, "text-anchor": "middle" }, "no data yet"));
  }
  let legendX = pad.left;
  series.forEach((serie, index) => {
    const cls = `s${index % 3}`;
    let d = "";
    let penDown = false;
    let last = null;
    serie.values.forEach((v, i) => {
      if (v === null || v === undefined || !Number.isFinite(v)) {
        penDown = false; // a gap: no line across a window without data
        return;
      }
      d += `${penDown ? "L" : "M"}${xAt(i).toFixed(1)},${yAt(v).toFixed(1)} `;
      penDown = true;
      last = [i, v];
    });
    if (d) svg.append(s("path", { d: d.trim(), class: `line ${cls}` }));
    if (last) svg.append(marker(MARKERS[index % 3], xAt(last[0]), yAt(last[1]), cls));
    const label = `${serie.name}: ${last ? fmt(last[1]) : "-"}`;
    svg.append(marker(MARKERS[index % 3], legendX + 4, height - 8, cls));
    svg.append(s("text", { x: legendX + 12, y: height - 4, "data-series": serie.name }, label));
    legendX += 16 + label.length * 6.5;
  });
  return svg;
}

/** A progress bar with its figure written beside it: `done` of `total`. */
export function progress(done, total, label = "") {
  const width = 120;
  const share = total > 0 ? Math.min(1, done / total) : 0;
  const svg = s("svg", { width, height: 12, role: "img", "aria-label": `${done} of ${total}` });
  svg.append(s("rect", { x: 0.5, y: 0.5, width: width - 1, height: 11, fill: "none", stroke: "#57606a" }));
  svg.append(s("rect", { x: 1, y: 1, width: (width - 2) * share, height: 10, fill: "#1a7f37" }));
  const span = document.createElement("span");
  span.className = "progress";
  span.append(svg, `${done}/${total} (${Math.round(share * 100)}%)${label ? ` ${label}` : ""}`);
  return span;
}
