// Alerts and drift: open (and acknowledged) alerts with ack for operators; drift per cohort of every model's
// newest profiled version against its reference profile, with the estimated accuracy.
import { api, confirmAction, fill, fmtNum, fmtTime, h, status, table } from "../app.js";

async function driftSections(by) {
  const models = await api("/models");
  const profiled = [];
  for (const model of models.data) {
    const newest = [...model.versions].reverse().find((v) => v.profile_sha256);
    if (newest) profiled.push({ name: model.name, version: newest.version });
  }
  if (!profiled.length) return [h("p", { class: "empty" }, "no model version has a reference profile, so no drift is measured (`edgefleet compress` writes one; docs/drift.md)")];
  const reports = await Promise.all(profiled.map((p) =>
    api(`/drift/${encodeURIComponent(p.name)}/${encodeURIComponent(p.version)}`, { query: { by } })));
  return reports.map((report) => [
    h("h3", {}, `${report.model}:${report.version} (window ${Math.round(report.window_s / 60)} min, reference accuracy ${fmtNum(report.reference.accuracy, 3)}) `,
      h("a", { href: `#/drift/${encodeURIComponent(report.model)}/${encodeURIComponent(report.version)}`, "data-drift-link": "" }, "over time →")),
    table(["cohort", { title: "devices", num: true }, { title: "rows", num: true }, "verdict", { title: "max KS", num: true },
      { title: "class PSI", num: true }, { title: "class JS", num: true }, "estimated accuracy", "reasons"],
      report.cohorts.map((c) => [
        c.cohort, String(c.devices.length), fmtNum(c.rows), status(c.insufficient ? "insufficient" : c.drifted ? "drifted" : "stable"),
        fmtNum(c.max_ks, 3), fmtNum(c.class_psi, 3), fmtNum(c.class_js, 3),
        `${fmtNum(c.estimated_accuracy, 3)} (${c.accuracy_drop == null ? "-" : `drop ${fmtNum(c.accuracy_drop, 3)}`})`,
        (c.reasons || []).join("; ") || "-",
      ]),
      { empty: "no sketches in the window yet", label: `drift of ${report.model}:${report.version}` }),
  ]);
}

export function mount(el, ctx) {
  const by = h("select", { id: "drift-by", "aria-label": "cohorts" });
  const fillCohorts = (keys) => {
    const wanted = by.value || ctx.query.get("by") || "";
    fill(by, h("option", { value: "" }, "the whole fleet"), h("option", { value: "device" }, "each device"),
      keys.map((k) => h("option", { value: k }, `each value of tag ${k}`)));
    by.value = ["", "device", ...keys].includes(wanted) ? wanted : "";
  };
  fillCohorts([]);
  let tagKeys = "";
  const message = h("p", { role: "alert", id: "ack-result" });
  const alertsBox = h("div", { id: "alerts" });
  const driftBox = h("div", { id: "drift" });
  by.addEventListener("change", () => { ctx.setQuery({ by: by.value }); handle.refresh(); });
  el.append(h("h1", {}, "Alerts and drift"), message, alertsBox,
    h("h2", {}, "Drift per cohort"), h("div", { class: "filters" }, h("label", {}, "Cohorts: ", by)), driftBox);

  async function ack(alert) {
    const answer = await confirmAction({ title: `Acknowledge alert #${alert.id}?`, message: `${alert.rule} in ${alert.cohort}: ${alert.message}. It still resolves by itself when its condition goes.`, confirm: "acknowledge", reason: true });
    if (!answer.ok) return;
    let outcome;
    try {
      await api(`/alerts/${alert.id}/ack`, { method: "POST", body: { note: answer.reason || null } });
      outcome = ["", `alert #${alert.id} acknowledged`];
    } catch (error) {
      outcome = ["error", `ack refused: ${error.message}`];
    }
    // The table is redrawn first, so that what the message says is what the table shows.
    await handle.refresh();
    [message.className, message.textContent] = outcome;
  }

  // A refresh started earlier (the periodic one) can answer after a later one (after an ack): only the newest
  // refresh draws, so stale alerts never overwrite fresh ones.
  let generation = 0;
  // Drift is computed from sketches and can take seconds on a busy coordinator: alerts never wait for it. One drift
  // query runs at a time per cohort choice; a periodic refresh that finds one in flight leaves it to finish.
  let driftGeneration = 0;
  let driftInFlight = null; // the `by` of the drift query in flight, or null

  async function drawDrift() {
    const wanted = by.value || undefined;
    if (driftInFlight !== null && driftInFlight === (wanted || "")) return;
    const mine = ++driftGeneration;
    driftInFlight = wanted || "";
    try {
      const drift = await driftSections(wanted);
      if (mine === driftGeneration) fill(driftBox, ...drift.flat());
    } catch (error) {
      if (mine === driftGeneration) fill(driftBox, h("p", { class: "error", role: "status" }, `drift query failed: ${error.message}`));
    } finally {
      if (mine === driftGeneration) driftInFlight = null;
    }
  }

  const handle = {
    async refresh() {
      const mine = ++generation;
      const devices = await api("/devices");
      const keys = [...new Set(devices.data.flatMap((d) => Object.keys(d.tags || {})))].sort();
      if (keys.join(",") !== tagKeys) {
        tagKeys = keys.join(",");
        fillCohorts(keys);
      }
      drawDrift();
      const alerts = await api("/alerts", { query: { state: "unresolved", limit: 200 } });
      if (mine !== generation) return;
      const operator = ctx.can("operator");
      fill(alertsBox,
        h("h2", {}, `Open alerts (${alerts.count})`),
        table(["#", "severity", "state", "rule", "cohort", "model", "message", { title: "value", num: true },
          { title: "threshold", num: true }, "opened", operator ? "" : null].filter((c) => c !== null),
          alerts.data.map((a) => [
            String(a.id), status(a.severity), status(a.state), a.rule, a.cohort, a.model_name || "-", a.message,
            fmtNum(a.last_value, 4), fmtNum(a.threshold, 4),
            a.acked_by ? `${fmtTime(a.opened_at)} (acked by ${a.acked_by}${a.ack_note ? `: ${a.ack_note}` : ""})` : fmtTime(a.opened_at),
            operator ? (a.state === "open" ? h("button", { type: "button", "data-ack": String(a.id), onclick: () => ack(a) }, "acknowledge") : "-") : null,
          ].filter((c) => c !== null)),
          { empty: "no open alerts", label: "alerts" }),
      );
    },
  };
  return handle;
}
