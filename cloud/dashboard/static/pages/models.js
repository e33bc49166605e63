// Models: every model with its newest version's risk class, signing state and variants, and the high-risk versions
// still waiting for their card, approvals or signature (who signed, who could still sign).
import { api, fill, fmtTime, h, status, table } from "../app.js";

export function mount(el) {
  const listBox = h("div", { id: "models" });
  const approvalsBox = h("div", { id: "approvals" });
  el.append(h("h1", {}, "Models"), listBox, h("h2", {}, "Awaiting approval"), approvalsBox);
  return {
    async refresh() {
      const [models, approvals] = await Promise.all([api("/models"), api("/approvals")]);
      fill(listBox,
        table(["model", { title: "versions", num: true }, "newest", "risk class", "signing", "variants", "drift profile", "newest pushed"],
          models.data.map((m) => {
            const newest = m.versions[m.versions.length - 1];
            if (!newest) return [h("a", { href: `#/models/${encodeURIComponent(m.name)}` }, m.name), "0", "-", "-", "-", "-", "-", "-"];
            return [
              h("a", { href: `#/models/${encodeURIComponent(m.name)}` }, m.name),
              String(m.versions.length),
              newest.version,
              status(newest.risk_class),
              status(newest.signing_state),
              [newest.primary_variant, ...(newest.variants || []).map((v) => v.name)].join(", "),
              newest.profile_sha256 ? "✔ yes" : "– none",
              `${fmtTime(newest.created_at)}${newest.created_by ? ` by ${newest.created_by}` : ""}`,
            ];
          }),
          { empty: "no model pushed yet (`edgefleet models push`)", label: "models" }),
      );
      fill(approvalsBox,
        table(["version", "risk class", "signing", { title: "approvals", num: true }, "signed by", "could still sign", "why not deployable"],
          approvals.data.map((a) => [
            h("a", { href: `#/models/${encodeURIComponent(a.name)}` }, `${a.name}:${a.version}`),
            status(a.risk_class), status(a.signing_state), `${a.signed_by.length} of ${a.required}`,
            a.signed_by.join(", ") || "nobody yet", a.missing.join(", ") || "-", a.reason || "-",
          ]),
          { empty: "no high-risk version is waiting for approval", label: "approvals" }),
      );
    },
  };
}
