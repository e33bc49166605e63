// One model: its lineage (parent version → federated run → candidate) as a graph, and per version (newest first)
// its risk class, signing state, approvals with who signed, model card, variants and compression report.
import { ApiError, api, facts, fill, fmtNum, fmtTime, h, status, table } from "../app.js";
import { graph } from "../graph.js";

const SYMBOL = { signed: "✔", awaiting_approval: "…", unsigned: "○", completed: "✔", failed: "✖", stopped: "■",
  running: "▶", building: "⚙", pending: "…" };

const say = (word) => `${SYMBOL[word] || "•"} ${String(word).replaceAll("_", " ")}`;
const short = (text, n = 26) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);

/** The answer of `path`, or null when the coordinator has none (404: no card yet). */
async function optional(path) {
  try {
    return await api(path);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

/** Nodes and edges of the model's lineage: from the versions' lineage (their cards) and the federated runs. */
export function lineage(model, runs) {
  const nodes = new Map();
  const edges = new Set();
  const version = (v, record) => {
    const id = `v:${v}`;
    if (!nodes.has(id)) {
      nodes.set(id, record
        ? { id, label: `${model.name}:${v}`, sub: short(`${say(record.signing_state)} · ${record.risk_class} risk`), kind: "version" }
        : { id, label: `${model.name}:${v}`, sub: "not registered here", kind: "version missing" });
    }
    return id;
  };
  const run = (runId, record) => {
    const id = `r:${runId}`;
    if (!nodes.has(id) || record) {
      const sub = record ? `${say(record.status)} · ${new Set(record.rounds.map((r) => r.round)).size} rounds` : "run not listed";
      nodes.set(id, { id, label: `federated run fl-${runId}`, sub: short(sub), kind: "run", href: `#/federated/${runId}` });
    }
    return id;
  };
  model.versions.forEach((v) => version(v.version, v));
  for (const r of runs) {
    const box = run(r.id, r);
    edges.add(`${version(r.parent_version, model.versions.find((v) => v.version === r.parent_version))}|${box}`);
    if (r.candidate_version) {
      edges.add(`${box}|${version(r.candidate_version, model.versions.find((v) => v.version === r.candidate_version))}`);
    }
  }
  for (const v of model.versions) {
    const { parent_version: parent, run: label } = v.lineage || {};
    if (!parent) continue;
    const from = version(parent, model.versions.find((x) => x.version === parent));
    const flower = /^fl-(\d+)$/.exec(label || "");
    if (flower) {
      const box = run(flower[1], runs.find((r) => String(r.id) === flower[1]));
      edges.add(`${from}|${box}`);
      edges.add(`${box}|v:${v.version}`);
    } else {
      edges.add(`${from}|v:${v.version}`);
    }
  }
  return { nodes: [...nodes.values()], edges: [...edges].map((e) => e.split("|")) };
}

/** A compression report (or any JSON document) as facts and tables, two levels deep. */
function documentView(doc, depth = 0) {
  const scalar = (v) => v === null || typeof v !== "object";
  const text = (v) => (typeof v === "number" ? fmtNum(v, 4) : String(v ?? "-"));
  const pairs = [];
  const blocks = [];
  for (const [key, value] of Object.entries(doc || {})) {
    if (scalar(value)) pairs.push([key, text(value)]);
    else if (Array.isArray(value) && value.every(scalar)) pairs.push([key, value.map(text).join(", ") || "-"]);
    else if (Array.isArray(value)) {
      const columns = [...new Set(value.flatMap((row) => Object.keys(row || {}).filter((k) => scalar(row[k]))))].slice(0, 9);
      blocks.push(h("h4", {}, key), table(columns, value.map((row) => columns.map((c) => text(row?.[c]))), { label: key }));
    } else if (depth < 1) {
      blocks.push(h("h4", {}, key), documentView(value, depth + 1));
    } else {
      pairs.push([key, Object.entries(value).map(([k, v]) => `${k} ${scalar(v) ? text(v) : "…"}`).join(", ")]);
    }
  }
  return h("div", { class: "document" }, pairs.length ? facts(pairs) : null, blocks);
}

function cardView(card) {
  if (!card) return h("p", { class: "empty" }, "no model card yet (a high-risk version needs one before it can be approved)");
  const field = (value) => (value === null || typeof value !== "object" ? value ?? "-"
    : Object.entries(value).filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : typeof v === "number" ? fmtNum(v, 4) : v}`).join("; "));
  const known = ["intended_use", "training_data", "metrics", "limitations", "owner", "parent_version", "run"];
  const rest = Object.keys(card.card).filter((k) => !known.includes(k) && k !== "risk_class");
  return facts([
    ...known.filter((k) => card.card[k] !== undefined).map((k) => [k.replaceAll("_", " "), field(card.card[k])]),
    ...rest.map((k) => [k, field(card.card[k])]),
    ["card digest", h("span", { class: "mono" }, `sha256:${card.sha256.slice(0, 16)}…`)],
    ["card updated", `${fmtTime(card.updated_at)} by ${card.updated_by}`],
  ]);
}

function approvalsView(a) {
  if (a.required === 0) return h("p", {}, status("low"), " risk: signed by the coordinator's online key after the push's checks, no approvals needed");
  return facts([
    ["approvals", `${a.signed_by.length} of ${a.required} (role ${a.role || "-"})`],
    ["signed by", a.signed_by.length ? a.signed_by.map((n) => `✔ ${n}`).join(", ") : "nobody yet"],
    ["could still sign", a.missing.join(", ") || "-"],
    ["deployable", a.deployable ? status("deployable") : [status("not_deployable"), ` ${a.reason || ""}`]],
  ]);
}

function variantsView(v) {
  const report = v.compression_report || {};
  const measured = Object.fromEntries((report.variants || []).filter((m) => m && m.name).map((m) => [m.name, m]));
  const rows = [
    { name: v.primary_variant, format: v.format, size: v.size, primary: true, ...(measured[v.primary_variant] || {}) },
    ...(v.variants || []),
  ];
  return table(["variant", "format", "precision", "runtime", { title: "size KiB", num: true }, { title: "accuracy", num: true },
    { title: "agreement", num: true }, { title: "p50 ms", num: true }, "CPU features"],
    rows.map((r) => [r.primary ? `${r.name} (primary)` : r.name, r.format || "-", r.precision || "-", r.runtime || "-",
      fmtNum(r.size / 1024, 1), fmtNum(r.accuracy, 4), fmtNum(r.agreement, 4), fmtNum(r.latency_p50_ms, 3),
      (r.cpu_features || []).join(", ") || "-"]),
    { label: `variants of ${v.version}` });
}

function versionView(model, v, card, approvals) {
  const ref = `${encodeURIComponent(model.name)}/${encodeURIComponent(v.version)}`;
  const { parent_version: parent, run } = v.lineage || {};
  return h("section", { class: "version", id: `version-${v.version}`, "data-version": v.version },
    h("h2", {}, `Version ${v.version} `, status(v.risk_class), " ", status(v.signing_state)),
    facts([
      ["sha256", h("span", { class: "mono" }, v.sha256)],
      ["format / size", `${v.format}, ${fmtNum(v.size / 1024, 1)} KiB`],
      ["pushed", `${fmtTime(v.created_at)}${v.created_by ? ` by ${v.created_by}` : ""}`],
      ["lineage", parent ? `from ${model.name}:${parent}${run ? ` by ${run}` : ""}` : "- (no parent named in its card)"],
      ["trainable form", v.trainable ? `${v.trainable.format}, ${fmtNum(v.trainable.size / 1024, 1)} KiB` : "-"],
      ["drift", v.profile_sha256 ? h("a", { href: `#/drift/${ref}` }, "drift over time per cohort") : "no reference profile: drift is not measured"],
    ]),
    h("h3", {}, "Approvals"), approvalsView(approvals),
    h("h3", {}, "Model card"), cardView(card),
    h("h3", {}, "Variants"), variantsView(v),
    h("h3", {}, "Compression report"),
    v.compression_report ? documentView(v.compression_report) : h("p", { class: "empty" }, "no compression report attached (`edgefleet compress` writes one)"),
  );
}

export function mount(el, ctx) {
  const name = ctx.params[0];
  const path = `/models/${encodeURIComponent(name)}`;
  return {
    async refresh() {
      const [model, runs] = await Promise.all([api(path), api("/federated/runs", { query: { model: name, limit: 100 } })]);
      const newestFirst = [...model.versions].reverse();
      // The approval status says whether a card exists: no request that would only answer 404.
      const details = await Promise.all(newestFirst.map(async (v) => {
        const approvals = await api(`${path}/versions/${encodeURIComponent(v.version)}/approvals`);
        const card = approvals.has_card ? await optional(`${path}/versions/${encodeURIComponent(v.version)}/card`) : null;
        return [card, approvals];
      }));
      const { nodes, edges } = lineage(model, runs.data);
      fill(el, h("div", {},
        h("p", {}, h("a", { href: "#/models" }, "← Models")),
        h("h1", {}, `Model ${model.name}`),
        h("h2", {}, "Lineage"),
        h("p", { class: "empty" }, "parent version → federated run → candidate version; a box with rounded corners is a run (its page is a click away)."),
        h("div", { class: "graph-box" }, graph({ title: `lineage of ${model.name}`, nodes, edges })),
        newestFirst.length ? null : h("p", { class: "empty" }, "no version yet"),
        newestFirst.map((v, i) => versionView(model, v, details[i][0], details[i][1])),
      ));
    },
  };
}
