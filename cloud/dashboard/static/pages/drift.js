// Drift over time of one version (#/drift/{name}/{version}): per cohort, the drift query for consecutive ranges
// (`until` = the end of each range) charted against the thresholds it is judged by: estimated and labelled accuracy
// against the reference less the allowed drop, the largest feature KS against the smallest effect, the class PSI.
import { ApiError, api, fill, fmtNum, h, status, table } from "../app.js";
import { lineChart } from "../chart.js";

const WINDOWS = [[300, "5 min"], [900, "15 min"], [3600, "1 hour"], [86400, "1 day"]];
const POINTS = 12;

const clock = (date, windowS) => (windowS >= 86400 ? date.toLocaleDateString() : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false }));

/** The ends of `points` consecutive ranges of `windowS` seconds: whole ranges aligned on the window (their drift
 * no longer changes, so it is read once), then the range ending now (null). Oldest first. */
export function rangeEnds(nowMs, windowS, points) {
  const aligned = Math.floor(nowMs / 1000 / windowS) * windowS;
  const ends = [];
  for (let i = points - 2; i >= 0; i -= 1) ends.push(new Date((aligned - i * windowS) * 1000));
  ends.push(null);
  return ends;
}

function cohortView(cohort, reports, ends, windowS) {
  const rows = reports.map((r) => r.cohorts.find((c) => c.cohort === cohort) || null);
  const labels = ends.map((end) => (end ? clock(end, windowS) : "now"));
  const t = reports[reports.length - 1].thresholds;
  const reference = reports[reports.length - 1].reference.accuracy;
  const value = (key) => rows.map((c) => (c && !c.insufficient && typeof c[key] === "number" ? c[key] : null));
  const charts = [
    lineChart({ title: `${cohort}: accuracy`, labels, series: [
      { name: "estimated", values: value("estimated_accuracy") },
      { name: "labelled", values: rows.map((c) => (c && typeof c.labelled_accuracy === "number" ? c.labelled_accuracy : null)) },
      { name: "reference − drop", values: rows.map(() => (reference == null ? null : reference - t.accuracy_drop)) },
    ] }),
    lineChart({ title: `${cohort}: largest feature KS`, labels, series: [
      { name: "max KS", values: value("max_ks") },
      { name: "threshold (min effect)", values: rows.map(() => t.min_effect) },
    ] }),
    lineChart({ title: `${cohort}: class PSI`, labels, series: [
      { name: "class PSI", values: value("class_psi") },
      { name: "threshold", values: rows.map(() => t.class_psi) },
    ] }),
  ];
  const verdict = (c) => (!c ? status("insufficient") : status(c.insufficient ? "insufficient" : c.drifted ? "drifted" : "stable"));
  return h("section", { class: "cohort", "data-cohort": cohort },
    h("h2", {}, `Cohort ${cohort}`),
    h("div", { class: "charts" }, charts),
    table(["range ending", { title: "rows", num: true }, "verdict", { title: "max KS", num: true }, { title: "class PSI", num: true },
      { title: "estimated accuracy", num: true }, { title: "labelled accuracy", num: true }, "why"],
      [...rows.keys()].reverse().map((i) => {
        const c = rows[i];
        return [labels[i], fmtNum(c?.rows ?? 0), verdict(c), fmtNum(c?.max_ks, 3), fmtNum(c?.class_psi, 3),
          fmtNum(c?.estimated_accuracy, 3), c?.labelled_accuracy == null ? `- (${c?.labelled_reason || "no labels"})` : fmtNum(c.labelled_accuracy, 3),
          c ? (c.reasons || []).join("; ") || "-" : "no windows in this range"];
      }),
      { label: `drift over time of ${cohort}` }),
  );
}

export function mount(el, ctx) {
  const [name, version] = ctx.params;
  const path = `/drift/${encodeURIComponent(name)}/${encodeURIComponent(version)}`;
  const cache = new Map(); // closed ranges: "by|window|end" -> report
  const by = h("select", { id: "drift-by", "aria-label": "cohorts" });
  const windowSelect = h("select", { id: "drift-window", "aria-label": "range length" },
    WINDOWS.map(([s, label]) => h("option", { value: String(s) }, label)));
  windowSelect.value = ctx.query.get("window_s") || "300";
  if (!windowSelect.value) windowSelect.value = "300";
  let tagKeys = null;
  const body = h("div", { id: "drift-over-time" });
  const onChange = () => { ctx.setQuery({ by: by.value, window_s: windowSelect.value }); handle.refresh(); };
  by.addEventListener("change", onChange);
  windowSelect.addEventListener("change", onChange);
  el.append(
    h("p", {}, h("a", { href: "#/alerts" }, "← Alerts and drift"), " · ", h("a", { href: `#/models/${encodeURIComponent(name)}` }, `model ${name}`)),
    h("h1", {}, `Drift over time: ${name}:${version}`),
    h("div", { class: "filters" }, h("label", {}, "Cohorts: ", by), h("label", {}, "Each range: ", windowSelect),
      h("span", { class: "empty" }, `${POINTS} consecutive ranges, the last ending now`)),
    body,
  );

  const handle = {
    async refresh() {
      if (tagKeys === null) {
        const devices = await api("/devices");
        tagKeys = [...new Set(devices.data.flatMap((d) => Object.keys(d.tags || {})))].sort();
        const wanted = ctx.query.get("by") || "";
        fill(by, h("option", { value: "" }, "the whole fleet"), h("option", { value: "device" }, "each device"),
          tagKeys.map((k) => h("option", { value: k }, `each value of tag ${k}`)));
        by.value = ["", "device", ...tagKeys].includes(wanted) ? wanted : "";
      }
      const windowS = Number(windowSelect.value);
      const ends = rangeEnds(Date.now(), windowS, POINTS);
      let reports;
      try {
        reports = await Promise.all(ends.map(async (end) => {
          const key = `${by.value}|${windowS}|${end ? end.toISOString() : "now"}`;
          if (cache.has(key)) return cache.get(key);
          const report = await api(path, { query: { by: by.value || undefined, window_s: windowS, until: end ? end.toISOString() : undefined } });
          if (end) cache.set(key, report);
          return report;
        }));
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 404) throw error;
        fill(body, h("p", { class: "empty" }, `no drift for ${name}:${version}: ${error.message}`));
        return;
      }
      const wanted = new Set(ends.filter(Boolean).map((end) => `${by.value}|${windowS}|${end.toISOString()}`));
      for (const key of cache.keys()) if (!wanted.has(key)) cache.delete(key); // ranges that scrolled out of view
      const latest = reports[reports.length - 1];
      const cohorts = [...new Set(reports.flatMap((r) => r.cohorts.map((c) => c.cohort)))].sort();
      fill(body, h("div", {},
        h("p", {}, `Reference: ${fmtNum(latest.reference.rows)} rows, accuracy ${fmtNum(latest.reference.accuracy, 3)}. ` +
          `Judged by: feature KS ≥ ${latest.thresholds.min_effect} beyond noise (α ${latest.thresholds.alpha}), class PSI > ${latest.thresholds.class_psi}, ` +
          `estimated accuracy more than ${latest.thresholds.accuracy_drop} under the reference; at least ${latest.thresholds.min_rows} rows per range.`),
        cohorts.length ? cohorts.map((c) => cohortView(c, reports, ends, windowS))
          : h("p", { class: "empty" }, "no telemetry windows of this version in these ranges"),
      ));
    },
  };
  return handle;
}
