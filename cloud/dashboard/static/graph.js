// A small directed graph as inline SVG, drawn by the dashboard itself: boxes with text, arrows between them, laid
// out in columns by depth (a node one column right of every node pointing at it). Used for model lineage:
// parent version → federated run → candidate version. Kinds differ by outline (solid / dashed) and text, not colour.

const NS = "http://www.w3.org/2000/svg";
const BOX = { width: 170, height: 46, gapX: 56, gapY: 18, pad: 12 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Column and row of every node: column = longest path from a root (cycles cut after n passes), rows in the
 * order the nodes were given. Pure: `{id: {col, row}}` and the number of columns and rows. */
export function layout(nodes, edges) {
  const depth = Object.fromEntries(nodes.map((n) => [n.id, 0]));
  for (let pass = 0; pass < nodes.length; pass += 1) {
    let changed = false;
    for (const [from, to] of edges) {
      if (depth[from] === undefined || depth[to] === undefined) continue;
      if (depth[to] < depth[from] + 1) {
        depth[to] = depth[from] + 1;
        changed = true;
      }
    }
    if (!changed) break;
  }
  const rows = {};
  const place = {};
  for (const n of nodes) {
    const col = depth[n.id];
    rows[col] = (rows[col] ?? -1) + 1;
    place[n.id] = { col, row: rows[col] };
  }
  const cols = nodes.length ? Math.max(...Object.values(depth)) + 1 : 0;
  return { place, cols, rows: nodes.length ? Math.max(...Object.values(rows)) + 1 : 0 };
}

let serial = 0;

/** The graph of `nodes` [{id, label, sub, href, kind}] and `edges` [[fromId, toId]] as an SVG element. */
export function graph({ title, nodes, edges }) {
  const { place, cols, rows } = layout(nodes, edges);
  const width = Math.max(1, cols) * (BOX.width + BOX.gapX) - BOX.gapX + 2 * BOX.pad;
  const height = Math.max(1, rows) * (BOX.height + BOX.gapY) - BOX.gapY + 2 * BOX.pad;
  const at = (id) => {
    const p = place[id];
    return { x: BOX.pad + p.col * (BOX.width + BOX.gapX), y: BOX.pad + p.row * (BOX.height + BOX.gapY) };
  };
  const arrow = `arrow-${(serial += 1)}`;
  const svg = s("svg", { class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  const defs = s("defs");
  const head = s("marker", { id: arrow, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse" });
  head.append(s("path", { d: "M0,0 L10,5 L0,10 Z", class: "arrowhead" }));
  defs.append(head);
  svg.append(defs);
  for (const [from, to] of edges) {
    if (!place[from] || !place[to]) continue;
    const a = at(from);
    const b = at(to);
    const x1 = a.x + BOX.width;
    const y1 = a.y + BOX.height / 2;
    const x2 = b.x;
    const y2 = b.y + BOX.height / 2;
    const mid = (x1 + x2) / 2;
    svg.append(s("path", { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, class: "edge", "marker-end": `url(#${arrow})`,
      "data-edge": `${from}→${to}` }));
  }
  for (const n of nodes) {
    const { x, y } = at(n.id);
    const box = s("g", { class: `node ${n.kind || ""}`, "data-node": n.id });
    box.append(s("rect", { x, y, width: BOX.width, height: BOX.height, rx: n.kind === "run" ? 12 : 3 }));
    box.append(s("text", { x: x + 8, y: y + 18, class: "label" }, n.label));
    if (n.sub) box.append(s("text", { x: x + 8, y: y + 36, class: "sub" }, n.sub));
    if (n.href) {
      const link = s("a", { href: n.href });
      link.append(box);
      svg.append(link);
    } else {
      svg.append(box);
    }
  }
  return svg;
}
