// Rollouts: every rollout with its status, wave and device counts (newest first).
import { api, fill, fmtTime, h, status, table } from "../app.js";
import { progress } from "../chart.js";

export function mount(el) {
  return {
    async refresh() {
      const list = await api("/rollouts", { query: { limit: 100 } });
      fill(el,
        h("h1", {}, "Rollouts"),
        table(["id", "model", "from", "status", "wave", "devices updated", "reason / waiting for", "updated"],
          list.data.map((r) => [
            h("a", { href: `#/rollouts/${r.id}` }, `#${r.id}`),
            `${r.model_name}:${r.model_version}`,
            r.previous_version || "-",
            status(r.status),
            `${r.current_wave_number}/${r.wave_count}`,
            progress(r.counts?.succeeded || 0, r.device_count),
            r.reason || r.waiting || "-",
            fmtTime(r.updated_at),
          ]),
          { empty: "no rollouts yet (`edgefleet rollouts create`)", label: "rollouts" }),
      );
    },
  };
}
