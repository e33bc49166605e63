// Fleet: devices by status, model version and variant, and kind; filter by tag, search by id, offline only.
import { api, fill, fmtNum, fmtTime, h, status, table } from "../app.js";

function counts(values) {
  const out = new Map();
  for (const value of values) out.set(value, (out.get(value) || 0) + 1);
  return [...out.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
}

function card(title, entries, render = (k) => k) {
  return h("section", { class: "card", "aria-label": title }, h("h3", {}, title),
    entries.length ? h("ul", {}, entries.map(([key, n]) => h("li", {}, render(key), `: ${n}`))) : h("p", { class: "empty" }, "none"));
}

// A device's kind: its `profile` tag when it has one (simulated fleets of a demo), else what it reports it is
// (its CPU architecture and runtimes, e.g. `x86_64 · onnxruntime`); `-` for a device that never reported.
function kindOf(device) {
  if (device.tags?.profile) return device.tags.profile;
  const caps = device.capabilities || {};
  const parts = [caps.arch, (caps.runtimes || []).join("+")].filter(Boolean);
  return parts.length ? parts.join(" · ") : "-";
}

export function mount(el, ctx) {
  const search = h("input", { type: "search", id: "fleet-search", placeholder: "device id contains…", value: ctx.query.get("q") || "" });
  const tag = h("select", { id: "fleet-tag", "aria-label": "tag" }, h("option", { value: "" }, "any tag"));
  const offline = h("input", { type: "checkbox", id: "fleet-offline", checked: ctx.query.get("offline") === "1" });
  const results = h("div", { id: "fleet-results" });
  let last = null;
  const apply = () => {
    ctx.setQuery({ q: search.value.trim(), tag: tag.value, offline: offline.checked ? "1" : "" });
    if (last) draw(last);
  };
  search.addEventListener("input", apply);
  tag.addEventListener("change", apply);
  offline.addEventListener("change", apply);
  el.append(
    h("h1", {}, "Fleet"),
    h("div", { class: "filters" },
      h("label", {}, "Search ", search),
      h("label", {}, "Tag ", tag),
      h("label", {}, offline, " offline only")),
    results,
  );

  function fillTags(devices) {
    const wanted = tag.value || ctx.query.get("tag") || "";
    const all = [...new Set(devices.flatMap((d) => Object.entries(d.tags || {}).map(([k, v]) => `${k}=${v}`)))].sort();
    const have = [...tag.options].slice(1).map((o) => o.value);
    if (have.join("\n") !== all.join("\n")) {
      fill(tag, h("option", { value: "" }, "any tag"), all.map((t) => h("option", { value: t }, t)));
    }
    tag.value = all.includes(wanted) ? wanted : "";
  }

  function draw({ devices, summary }) {
    fillTags(devices);
    const lines = new Map((summary.devices || []).map((d) => [d.device_id, d]));
    const q = search.value.trim().toLowerCase();
    const [tagKey, tagValue] = tag.value ? tag.value.split(/=(.*)/s) : [null, null];
    const shown = devices.filter((d) =>
      (!q || d.id.toLowerCase().includes(q)) &&
      (!tagKey || (d.tags || {})[tagKey] === tagValue) &&
      (!offline.checked || d.status !== "online"));
    const version = (d) => (d.model_name ? `${d.model_name}:${d.model_version}` : "no model");
    const variant = (d) => `${version(d)} / ${lines.get(d.id)?.variant || "-"}`;
    fill(results,
      h("p", {}, `${shown.length} of ${devices.length} devices`,
        ` · ${summary.online_count ?? "-"} online · ${summary.inference_count ?? 0} inferences · `,
        `p50 ${fmtNum(summary.latency_p50_ms)} ms · p95 ${fmtNum(summary.latency_p95_ms)} ms`),
      h("div", { class: "cards" },
        card("By status", counts(shown.map((d) => d.status)), status),
        card("By model version / variant", counts(shown.map(variant))),
        card("By device kind", counts(shown.map(kindOf)))),
      table(
        ["device", "status", "model", "variant", "kind", "tags", { title: "inferences", num: true },
          { title: "errors", num: true }, { title: "p50 ms", num: true }, { title: "p95 ms", num: true }, "last seen"],
        shown.map((d) => {
          const line = lines.get(d.id) || {};
          return [
            h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id),
            status(d.status),
            version(d),
            line.variant || "-",
            kindOf(d),
            Object.entries(d.tags || {}).map(([k, v]) => `${k}=${v}`).join(" "),
            fmtNum(d.inference_count),
            fmtNum(d.error_count),
            fmtNum(line.latency_p50_ms),
            fmtNum(line.latency_p95_ms),
            fmtTime(d.last_seen),
          ];
        }),
        { empty: devices.length ? "no device matches the filters" : "no devices enrolled yet", label: "devices" },
      ),
    );
  }

  return {
    async refresh() {
      const [list, summary] = await Promise.all([api("/devices"), api("/fleet/summary")]);
      last = { devices: list.data, summary };
      draw(last);
    },
  };
}
