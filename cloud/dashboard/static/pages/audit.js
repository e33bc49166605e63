// The audit log: its verification (every hash and link recomputed, checkpoints and the head file checked:
// "verified ✓" or "broken ✗ at entry N"), and its entries newest first, a page at a time.
import { api, fill, fmtTime, h, status, table } from "../app.js";

const PAGE = 50;

function verdict(report, when) {
  if (!report) return h("p", { class: "empty" }, "verifying the chain…");
  const checked = `${report.entries} entries up to #${report.head_seq}, ${report.checkpoints} signed checkpoints` +
    `${report.latest_checkpoint_seq ? ` (latest at #${report.latest_checkpoint_seq})` : ""}; checked ${when}`;
  if (report.ok) {
    return h("div", { id: "audit-verdict", "data-ok": "true" },
      h("p", {}, status("verified"), `: the chain holds (${checked})`),
      (report.notes || []).length ? h("ul", {}, report.notes.map((n) => h("li", {}, n))) : null);
  }
  const first = report.problems.find((p) => p.seq !== null && p.seq !== undefined);
  return h("div", { id: "audit-verdict", "data-ok": "false" },
    h("p", { class: "error" }, status("broken"), first ? ` at entry ${first.seq}` : "", ` (${checked})`),
    table(["entry", "problem", "what it means"], report.problems.map((p) => [p.seq === null ? "-" : `#${p.seq}`, p.kind, p.message]),
      { label: "audit problems" }));
}

function details(value) {
  return Object.entries(value || {}).map(([k, v]) => `${k}: ${typeof v === "object" && v !== null ? JSON.stringify(v) : v}`).join("; ") || "-";
}

export function mount(el, ctx) {
  let before = Number(ctx.query.get("before")) || null; // show the entries before this seq (null: the newest)
  let report = null;
  let checkedAt = "";
  const verdictBox = h("div", {}, verdict(null));
  const pager = h("div", { class: "actions", id: "audit-pager" });
  const entriesBox = h("div", { id: "audit-entries" });

  async function verify() {
    fill(verdictBox, verdict(null));
    report = await api("/audit/verify");
    checkedAt = new Date().toLocaleTimeString([], { hour12: false });
    fill(verdictBox, verdict(report, checkedAt));
  }
  const again = h("button", { type: "button", id: "audit-verify", onclick: () => verify().catch((e) => fill(verdictBox, h("p", { class: "error" }, `verification failed: ${e.message}`))) }, "verify again");
  el.append(h("h1", {}, "Audit log"), h("h2", {}, "Verification"), verdictBox, again, h("h2", {}, "Entries (newest first)"), pager, entriesBox);

  const go = (seq) => {
    before = seq;
    ctx.setQuery({ before: seq });
    handle.refresh();
  };

  const handle = {
    async refresh() {
      if (!report) await verify(); // once when the page opens (it recomputes every hash), then on request
      const query = before ? { after_seq: Math.max(0, before - 1 - PAGE), limit: Math.max(1, Math.min(PAGE, before - 1)) } : { limit: PAGE };
      const page = before && before <= 1 ? { data: [], head_seq: 0 } : await api("/audit", { query });
      const rows = [...page.data].reverse();
      const oldest = rows.length ? rows[rows.length - 1].seq : null;
      fill(pager,
        h("span", {}, rows.length ? `entries #${oldest}–#${rows[0].seq} of ${page.head_seq}` : "no entries"),
        before ? h("button", { type: "button", "data-page": "newest", onclick: () => go(null) }, "⇤ newest") : null,
        before ? h("button", { type: "button", "data-page": "newer", onclick: () => go(before + PAGE <= page.head_seq ? before + PAGE : null) }, "← newer") : null,
        oldest && oldest > 1 ? h("button", { type: "button", "data-page": "older", onclick: () => go(oldest) }, "older →") : null,
      );
      const broken = new Set((report?.problems || []).map((p) => p.seq));
      fill(entriesBox, table(["#", "at", "actor", "action", "subject", "details", "hash"],
        rows.map((e) => [broken.has(e.seq) ? `✗ ${e.seq}` : String(e.seq), fmtTime(e.at), e.actor, e.action, e.subject, details(e.details),
          h("span", { class: "mono", title: e.hash }, e.hash.slice(0, 12))]),
        { empty: "the audit log has no entries yet", label: "audit entries" }));
    },
  };
  return handle;
}
