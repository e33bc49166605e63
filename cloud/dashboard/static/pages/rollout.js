// One rollout: waves with progress, the gates' figures against their thresholds, decisions with reasons, and
// pause / resume / abort / promote for operators (each behind a confirmation).
import { api, confirmAction, facts, fill, fmtNum, fmtTime, h, status, table } from "../app.js";
import { progress } from "../chart.js";

const TERMINAL = new Set(["completed", "aborted", "rolled_back"]);

// Which commands apply in which status (the engine refuses the others with a reason, 409).
const COMMANDS = [
  { name: "pause", when: (s) => ["pending", "running", "baking"].includes(s), what: "Stop dispatching to more devices; installs in flight still report.", reason: true },
  { name: "resume", when: (s) => s === "paused", what: "Continue where it stopped; a bake in progress starts over." },
  { name: "promote", when: (s) => ["running", "baking", "paused"].includes(s), what: "Start the next wave now, skipping the rest of this wave's bake and gates." },
  { name: "abort", when: (s) => !TERMINAL.has(s), what: "Stop this rollout for good (devices keep what they run).", reason: true, danger: true },
];

// A gate's figure with 4 decimals always (an observed 0 reads `0.0000` next to a threshold of `0.5000`).
const figure = (value) => (typeof value === "number" ? value.toFixed(4) : fmtNum(value));

function gates(report) {
  if (!report) return h("p", { class: "empty" }, "no gate evaluated yet");
  const title = report.live ? `Gates of wave ${report.wave_number} (live, on the telemetry so far)` : `Gates of wave ${report.wave_number ?? "-"} (last verdict)`;
  return [
    h("h2", {}, title),
    table(["gate", "verdict", { title: "observed", num: true }, { title: "threshold", num: true }, "why"],
      (report.results || []).map((r) => [r.name, status(r.verdict), figure(r.observed), figure(r.threshold), r.reason]),
      { empty: "no gates enabled", label: "gates" }),
  ];
}

export function mount(el, ctx) {
  const id = ctx.params[0];
  const message = h("p", { role: "alert", id: "command-result" });

  async function command(spec, rollout) {
    const answer = await confirmAction({
      title: `${spec.name[0].toUpperCase()}${spec.name.slice(1)} rollout #${id}?`,
      message: `${rollout.model_name}:${rollout.model_version} is ${rollout.status}. ${spec.what}`,
      confirm: spec.name,
      reason: Boolean(spec.reason),
    });
    if (!answer.ok) return;
    const body = spec.reason && answer.reason ? { reason: answer.reason } : undefined;
    try {
      const result = await api(`/rollouts/${id}/${spec.name}`, { method: "POST", body });
      message.className = "";
      message.textContent = `${spec.name}: ${result.applied ? "applied" : "queued"}, rollout now ${result.rollout.status}`;
    } catch (error) {
      message.className = "error";
      message.textContent = `${spec.name} refused: ${error.message}`;
    }
    await handle.refresh();
  }

  const handle = {
    async refresh() {
      const r = await api(`/rollouts/${id}`, { query: { decisions: 100, devices: 0 } }); // the page shows counts, not device rows
      const buttons = ctx.can("operator")
        ? COMMANDS.filter((c) => c.when(r.status)).map((c) =>
            h("button", { type: "button", class: c.danger ? "danger" : null, "data-command": c.name, onclick: () => command(c, r) }, c.name))
        : [];
      fill(el,
        h("p", {}, h("a", { href: "#/rollouts" }, "← Rollouts")),
        h("h1", {}, `Rollout #${r.id}: ${r.model_name}:${r.model_version} `, status(r.status)),
        buttons.length ? h("div", { class: "actions", "aria-label": "operator actions" }, buttons) : null,
        message,
        facts([
          ["from version", r.previous_version || "- (new model: absolute limits)"],
          ["judged against", r.baseline],
          ["wave", `${r.current_wave_number} of ${r.wave_count}`],
          ["devices", progress(r.counts?.succeeded || 0, r.device_count, "updated")],
          ["by phase", Object.entries(r.counts || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "-"],
          ["reason", r.reason || "-"],
          ["waiting for", r.waiting || "-"],
          ["created / updated", `${fmtTime(r.created_at)} / ${fmtTime(r.updated_at)}`],
        ]),
        h("h2", {}, "Waves"),
        table(["wave", "size", "state", "progress", { title: "bake s", num: true }, "by phase"],
          r.waves.map((w) => [String(w.number), w.size, status(w.state), progress(w.counts?.succeeded || 0, w.devices),
            fmtNum(w.bake_seconds), Object.entries(w.counts || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "-"]),
          { label: "waves" }),
        gates(r.gates),
        h("h2", {}, "Decisions (newest first)"),
        table(["#", "at", "kind", "reason"], [...r.decisions].reverse().map((d) => [String(d.seq), fmtTime(d.at), d.kind, d.message]),
          { empty: "no decisions yet", label: "decisions" }),
      );
    },
  };
  return handle;
}
