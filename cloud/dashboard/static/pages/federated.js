// Federated runs: every run with its status, rounds and candidate (#/federated); one run (#/federated/{id}): its
// cohort, parameters, the nodes that took part in each round, and its metrics per round as charts.
import { api, facts, fill, fmtNum, fmtTime, h, status, table } from "../app.js";
import { lineChart } from "../chart.js";

const roundsOf = (run) => [...new Set(run.rounds.map((r) => r.round))].sort((a, b) => a - b);
const selector = (s) => Object.entries(s || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "every eligible device";

function listView(runs) {
  return [
    h("h1", {}, "Federated runs"),
    table(["run", "model", "status", "rounds", { title: "devices", num: true }, "cohort", "candidate", "started", "finished"],
      runs.data.map((r) => [
        h("a", { href: `#/federated/${r.id}` }, `fl-${r.id}`),
        h("a", { href: `#/models/${encodeURIComponent(r.model_name)}` }, `${r.model_name}:${r.parent_version}`),
        status(r.status),
        `${roundsOf(r).length} of ${r.params?.rounds ?? "?"}`,
        String(r.devices.length),
        selector(r.selector),
        r.candidate_version ? `${r.model_name}:${r.candidate_version}` : r.error ? `✖ ${r.error}` : "-",
        `${fmtTime(r.created_at)}${r.created_by ? ` by ${r.created_by}` : ""}`,
        fmtTime(r.finished_at),
      ]),
      { empty: "no federated run yet (`edgefleet federated start`; docs/federated.md)", label: "federated runs" }),
  ];
}

// Counts and timings (`num-examples`, `time-train-s`, ...) stay in the rounds table: on the quality metrics' scale
// (accuracy, loss) they would flatten every other line.
const UNCHARTED = /^(num|time)[-_]/;

/** One chart per phase (train, evaluate): each numeric quality metric over the rounds. */
function metricCharts(run) {
  const rounds = roundsOf(run);
  const charts = [];
  for (const phase of [...new Set(run.rounds.map((r) => r.phase))]) {
    const lines = run.rounds.filter((r) => r.phase === phase);
    const keys = [...new Set(lines.flatMap((r) => Object.keys(r.metrics || {}).filter((k) => typeof r.metrics[k] === "number" && !UNCHARTED.test(k))))].sort();
    if (!keys.length) continue;
    const at = (round, key) => lines.find((r) => r.round === round)?.metrics?.[key] ?? null;
    charts.push(lineChart({
      title: `${phase} metrics per round`,
      labels: rounds.map((n) => `round ${n}`),
      series: keys.map((key) => ({ name: key, values: rounds.map((n) => at(n, key)) })),
    }));
  }
  return charts.length ? h("div", { class: "charts" }, charts) : h("p", { class: "empty" }, "no metrics reported yet");
}

/** Which node answered in which round and phase (✔ replied, ✖ failed or missing). */
function nodesView(run) {
  const nodes = [...new Set([...run.node_ids, ...run.rounds.flatMap((r) => [...(r.nodes || []), ...(r.missing || [])])])];
  const lines = run.rounds;
  if (!nodes.length) return h("p", { class: "empty" }, "no node has joined yet");
  const cell = (line, node) => {
    if ((line.errors || {})[node]) return `✖ ${line.errors[node]}`;
    if ((line.missing || []).includes(node)) return "✖ no answer";
    if ((line.nodes || []).includes(node)) return "✔";
    return "–";
  };
  return table(["node", ...lines.map((l) => `r${l.round} ${l.phase}`)],
    nodes.map((node) => [h("span", { class: "mono" }, node), ...lines.map((l) => cell(l, node))]),
    { label: "nodes per round" });
}

function runView(run) {
  const p = run.params || {};
  return [
    h("p", {}, h("a", { href: "#/federated" }, "← Federated runs")),
    h("h1", {}, `Federated run fl-${run.id}: ${run.model_name}:${run.parent_version} `, status(run.status)),
    facts([
      ["parent", h("a", { href: `#/models/${encodeURIComponent(run.model_name)}` }, `${run.model_name}:${run.parent_version}`)],
      ["candidate", run.candidate_version ? `${run.model_name}:${run.candidate_version}` : "-"],
      ["rollout of the candidate", run.rollout_id ? h("a", { href: `#/rollouts/${run.rollout_id}` }, `#${run.rollout_id}`) : "-"],
      ["cohort", `${selector(run.selector)}: ${run.devices.length} devices`],
      ["rounds", `${roundsOf(run).length} of ${p.rounds ?? "?"}`],
      ["parameters", Object.entries(p).filter(([, v]) => v !== null && v !== undefined && typeof v !== "object").map(([k, v]) => `${k} ${v}`).join(", ") || "-"],
      ["Flower run", run.flower_run_id || "-"],
      ["error", run.error || "-"],
      ["started / finished", `${fmtTime(run.created_at)}${run.created_by ? ` by ${run.created_by}` : ""} / ${fmtTime(run.finished_at)}`],
    ]),
    h("h2", {}, "Metrics per round"),
    metricCharts(run),
    h("h2", {}, "Rounds"),
    table(["round", "phase", { title: "replies", num: true }, { title: "failures", num: true }, "metrics", "at"],
      run.rounds.map((r) => [String(r.round), r.phase, fmtNum(r.replies), fmtNum(r.failures),
        Object.entries(r.metrics || {}).map(([k, v]) => `${k} ${fmtNum(v, 4)}`).join(", ") || "-",
        r.time ? fmtTime(r.time * 1000) : "-"]),
      { empty: "no round finished yet", label: "rounds" }),
    h("h2", {}, "Participating nodes"),
    nodesView(run),
    h("h3", {}, "Devices in the cohort"),
    h("p", {}, run.devices.length ? run.devices.map((d, i) => [i ? ", " : "", h("a", { href: `#/devices/${encodeURIComponent(d)}` }, d)]) : "-"),
  ];
}

export function mount(el, ctx) {
  const id = ctx.params[0];
  return {
    async refresh() {
      const content = id ? runView(await api(`/federated/runs/${id}`)) : listView(await api("/federated/runs", { query: { limit: 200 } }));
      fill(el, h("div", {}, content));
    },
  };
}
