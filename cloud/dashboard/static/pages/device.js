// Device: reported state, capabilities, certificate and enrolment, update history, telemetry charts, cohort drift.
import { api, facts, fill, fmtNum, fmtTime, h, histogramQuantile, meta, status, table } from "../app.js";
import { lineChart } from "../chart.js";

const EVENTS = 50;
const WINDOWS = 120;

function capabilities(caps) {
  if (!caps || !Object.keys(caps).length) return h("p", { class: "empty" }, "not reported yet");
  return facts(Object.entries(caps).map(([k, v]) => [k, Array.isArray(v) ? v.join(", ") : typeof v === "object" ? JSON.stringify(v) : String(v)]));
}

function charts(windows, bounds) {
  const labels = windows.map((w) => new Date(w.window_end).toLocaleTimeString([], { hour12: false }));
  const q = (w, p) => histogramQuantile(w.latency_histogram || [], p, bounds);
  return h("div", { class: "charts" },
    lineChart({ title: "Inferences per window", labels, series: [{ name: "inferences", values: windows.map((w) => w.inference_count) }] }),
    lineChart({ title: "Errors per window", labels, series: [{ name: "errors", values: windows.map((w) => w.error_count) }] }),
    lineChart({ title: "Latency", unit: "ms, bucket bound", labels, series: [
      { name: "p50", values: windows.map((w) => q(w, 0.5)) },
      { name: "p95", values: windows.map((w) => q(w, 0.95)) },
    ] }));
}

async function cohortDrift(device) {
  if (!device.model_name || !device.model_version) return h("p", { class: "empty" }, "no active model");
  const path = `/models/${encodeURIComponent(device.model_name)}/versions/${encodeURIComponent(device.model_version)}`;
  const version = await api(path);
  if (!version.profile_sha256) return h("p", { class: "empty" }, `${device.model_name}:${device.model_version} has no reference profile, so no drift is measured`);
  const report = await api(`/drift/${encodeURIComponent(device.model_name)}/${encodeURIComponent(device.model_version)}`, { query: { by: "device" } });
  const cohort = report.cohorts.find((c) => c.devices.includes(device.id));
  if (!cohort) return h("p", { class: "empty" }, "no sketches from this device in the drift window yet");
  const verdict = cohort.insufficient ? "insufficient" : cohort.drifted ? "drifted" : "stable";
  const shown = facts([
    ["cohort", cohort.cohort],
    ["verdict", status(verdict)],
    ["rows", fmtNum(cohort.rows)],
    ["max KS", fmtNum(cohort.max_ks, 3)],
    ["class PSI / JS", `${fmtNum(cohort.class_psi, 3)} / ${fmtNum(cohort.class_js, 3)}`],
    ["estimated accuracy", `${fmtNum(cohort.estimated_accuracy, 3)} (reference ${fmtNum(cohort.reference_accuracy, 3)})`],
    ["reasons", (cohort.reasons || []).join("; ") || "-"],
  ]);
  shown.setAttribute("aria-label", "drift of its cohort");
  return shown;
}

export function mount(el, ctx) {
  const id = ctx.params[0];
  return {
    async refresh() {
      const base = `/devices/${encodeURIComponent(id)}`;
      const [device, events, telemetry, info] = await Promise.all([
        api(base), api(`${base}/events`, { query: { limit: EVENTS } }), api(`${base}/telemetry`, { query: { limit: WINDOWS } }), meta(),
      ]);
      const drift = await cohortDrift(device);
      const cert = device.certificate;
      fill(el,
        h("p", {}, h("a", { href: "#/fleet" }, "← Fleet")),
        h("h1", {}, `Device ${device.id} `, status(device.status)),
        h("h2", {}, "Reported state"),
        facts([
          ["model", device.model_name ? `${device.model_name}:${device.model_version}` : "none"],
          ["variant", device.active_variant || "-"],
          ["update phase", device.update_phase || "-"],
          ["generation (desired / reported)", `${device.desired_generation} / ${device.reported_generation ?? "-"}`],
          ["last error", device.last_error_code ? `${device.last_error_code}: ${device.last_error_message || ""}` : "-"],
          ["agent", device.agent_version || "-"],
          ["tags", Object.entries(device.tags || {}).map(([k, v]) => `${k}=${v}`).join(" ") || "-"],
          ["inferences / errors", `${device.inference_count} / ${device.error_count}`],
          ["last seen", fmtTime(device.last_seen)],
          ["anomaly", device.anomaly || "-"],
        ]),
        h("h2", {}, "Enrolment and certificate"),
        facts([
          ["enrolment", status(device.enrolment)],
          ["enrolled", fmtTime(device.enrolled_at)],
          ["revoked", fmtTime(device.revoked_at)],
          ["certificate serial", cert ? h("code", {}, cert.serial) : "none"],
          ["certificate valid until", cert ? fmtTime(cert.not_after) : "-"],
          ["certificate revoked", cert ? fmtTime(cert.revoked_at) : "-"],
        ]),
        h("h2", {}, "Capabilities"),
        capabilities(device.capabilities),
        h("h2", {}, `Telemetry (last ${telemetry.count} windows)`),
        charts(telemetry.data, info.latency_buckets_ms),
        h("h2", {}, "Drift of its cohort"),
        drift,
        h("h2", {}, `Update history (newest ${EVENTS} events)`),
        table(["at", "kind", "generation", "phase", "message", "error"],
          [...events.data].reverse().map((e) => [fmtTime(e.at), e.kind, e.generation ?? "-", e.phase || "-", e.message,
            e.error_code ? `${e.error_code}: ${e.error_message || ""}` : "-"]),
          { empty: "no events yet", label: "events" }),
      );
    },
  };
}
