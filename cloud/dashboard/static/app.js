// The dashboard's frame: THE API client of the browser (`api`), the login, hash routing, polling, and the helpers
// every page uses. A page is one module in pages/ exporting `mount(el, ctx)` -> `{ refresh() }` and a line in ROUTES.

export const POLL_MS = 3000;

// One line per page: the hash pattern, the module in pages/, and the name in the navigation (none: reached by link).
export const ROUTES = [
  { pattern: /^\/fleet$/, page: "fleet", nav: "Fleet" },
  { pattern: /^\/devices\/([^/]+)$/, page: "device" },
  { pattern: /^\/rollouts$/, page: "rollouts", nav: "Rollouts" },
  { pattern: /^\/rollouts\/(\d+)$/, page: "rollout" },
  { pattern: /^\/alerts$/, page: "alerts", nav: "Alerts" },
  { pattern: /^\/drift\/([^/]+)\/([^/]+)$/, page: "drift" },
  { pattern: /^\/models$/, page: "models", nav: "Models" },
  { pattern: /^\/models\/([^/]+)$/, page: "model" },
  { pattern: /^\/federated$/, page: "federated", nav: "Federated runs" },
  { pattern: /^\/federated\/(\d+)$/, page: "federated" },
  { pattern: /^\/audit$/, page: "audit", nav: "Audit" },
];

const ROLE_RANK = { viewer: 0, publisher: 0, approver: 0, operator: 1, admin: 9 };

// -- the API client ----------------------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export const session = {
  get token() { return sessionStorage.getItem("edgefleet.token"); },
  get name() { return sessionStorage.getItem("edgefleet.name"); },
  get role() { return sessionStorage.getItem("edgefleet.role"); },
  save(token, who) {
    sessionStorage.setItem("edgefleet.token", token);
    sessionStorage.setItem("edgefleet.name", who.name);
    sessionStorage.setItem("edgefleet.role", who.role);
  },
  clear() {
    for (const key of ["token", "name", "role"]) sessionStorage.removeItem(`edgefleet.${key}`);
  },
};

/** `/api/v1{path}` with the session's bearer token; the decoded body, or an ApiError whose message is the
 * problem's `detail` (what the coordinator says is wrong). `opts`: method, body (sent as JSON), query, token. */
export async function api(path, opts = {}) {
  const headers = { Accept: "application/json, application/problem+json" };
  const token = opts.token ?? session.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const query = opts.query ? `?${new URLSearchParams(clean(opts.query))}` : "";
  let response;
  try {
    response = await fetch(`/api/v1${path}${query}`, {
      method: opts.method || "GET",
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(`the coordinator could not be reached (${error.message})`, 0);
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  if (!response.ok) {
    const detail = (body && typeof body === "object" && (body.detail || body.title)) || response.statusText;
    if (response.status === 401 && !opts.token) logout(`signed out: ${detail}`);
    throw new ApiError(`${response.status}: ${detail}`, response.status);
  }
  return body;
}

let metaPromise = null;

/** What the pages need from the coordinator's `protocol` (`/ui/meta.json`: latency bucket bounds), read once. */
export function meta() {
  metaPromise ??= fetch("meta.json", { cache: "no-store" }).then((r) => r.json());
  return metaPromise;
}

/** The latency (ms) at quantile `q` of a telemetry histogram: the upper bound of the bucket holding it, as the
 * coordinator computes it (null when empty or above the last bound). */
export function histogramQuantile(histogram, q, bounds) {
  const count = histogram.reduce((a, b) => a + b, 0);
  if (!count) return null;
  let seen = 0;
  for (let i = 0; i < histogram.length; i += 1) {
    seen += histogram[i];
    if (seen >= q * count && histogram[i]) return i < bounds.length ? bounds[i] : null;
  }
  return null;
}

function clean(query) {
  return Object.fromEntries(Object.entries(query).filter(([, v]) => v !== undefined && v !== null && v !== ""));
}

/** Whether the signed-in role may do what `needed` may (admin may everything). */
export function can(needed) {
  const role = session.role;
  if (role === "admin") return true;
  if (needed === "operator") return role === "operator";
  return role === needed;
}

// -- DOM helpers -------------------------------------------------------------------------------------------------

/** An element: `h("a", {href: "#/x", class: "y"}, "text", child)`; `on*` attributes become listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** Replace `el`'s children the way `h` adds them (arrays flattened; null, undefined and false skipped): the DOM's own
 * `replaceChildren` would write `null` or `[object HTMLElement]` as text instead. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** A table from column headers and rows of cells; `num` columns align right. */
export function table(columns, rows, { empty = "nothing to show", label } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, scope: "col" }, c.title ?? c)));
  const body = rows.map((cells) => h("tr", {}, cells.map((cell, i) => h("td", { class: columns[i].num ? "num" : null }, cell))));
  return h("table", { "aria-label": label }, h("thead", {}, head), h("tbody", {}, body));
}

/** A definition list of [term, value] pairs. */
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value ?? "-")]));
}

// Status words as symbol + text (+ a colour class that only adds to them).
const STATUS = {
  online: ["●", "ok"], offline: ["○", "bad"], unknown: ["?", "muted"],
  running: ["▶", "info"], baking: ["◷", "info"], pending: ["…", "muted"], paused: ["‖", "warn"],
  completed: ["✔", "ok"], succeeded: ["✔", "ok"], aborted: ["✖", "bad"], rolled_back: ["↺", "bad"],
  rolling_back: ["↺", "warn"], failed: ["✖", "bad"], passed: ["✔", "ok"], insufficient_data: ["…", "muted"],
  not_applicable: ["–", "muted"], open: ["⚠", "bad"], acked: ["✓", "warn"], resolved: ["✔", "ok"],
  drifted: ["⚠", "bad"], stable: ["✔", "ok"], insufficient: ["…", "muted"], enrolled: ["✔", "ok"],
  revoked: ["✖", "bad"], decommissioned: ["✖", "muted"], critical: ["‼", "bad"], warning: ["⚠", "warn"],
  done: ["✔", "ok"], current: ["▶", "info"], waiting: ["…", "muted"],
  building: ["⚙", "info"], stopped: ["■", "muted"], signed: ["✔", "ok"], awaiting_approval: ["…", "warn"],
  unsigned: ["○", "muted"], high: ["▲", "warn"], low: ["▽", "muted"], verified: ["✓", "ok"], broken: ["✗", "bad"],
  deployable: ["✔", "ok"], not_deployable: ["✖", "bad"],
};

export function status(word) {
  const [symbol, tone] = STATUS[word] || ["•", "muted"];
  return h("span", { class: `status ${tone}`, "data-status": word }, `${symbol} ${String(word).replaceAll("_", " ")}`);
}

export function fmtTime(value) {
  if (!value) return "-";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

export function fmtNum(value, digits = 2) {
  if (value === null || value === undefined) return "-";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

/** Ask before acting: a modal with the action's name, what it does and an optional reason; resolves
 * `{ok, reason}`. */
export function confirmAction({ title, message, confirm = "Confirm", reason = false }) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-message").textContent = message;
  document.getElementById("confirm-ok").textContent = confirm;
  document.getElementById("confirm-reason-label").hidden = !reason;
  const input = document.getElementById("confirm-reason");
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve({ ok: dialog.returnValue === "confirm", reason: input.value.trim() }),
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
  });
}

// -- the frame ---------------------------------------------------------------------------------------------------

const view = () => document.getElementById("view");
let current = null; // { hash, handle }
let timer = null;
let refreshing = false;
let loginMessage = "";

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/fleet";
  const [path, query = ""] = raw.split("?");
  return { path, query: new URLSearchParams(query) };
}

/** Change the query part of the hash without reloading the page (filters). */
export function setQuery(values) {
  const { path, query } = parseHash();
  for (const [key, value] of Object.entries(values)) {
    if (value === undefined || value === null || value === "" || value === false) query.delete(key);
    else query.set(key, value);
  }
  const text = query.toString();
  history.replaceState(null, "", `#${path}${text ? `?${text}` : ""}`);
}

function stamp(error) {
  const el = document.getElementById("stamp");
  const time = new Date().toLocaleTimeString([], { hour12: false });
  el.classList.toggle("failed", Boolean(error));
  el.textContent = error ? `update failed ${time}: ${error.message}` : `updated ${time}`;
}

async function refresh() {
  if (!current || refreshing || document.getElementById("confirm").open) return;
  refreshing = true;
  try {
    await current.handle.refresh();
    stamp(null);
  } catch (error) {
    stamp(error);
  } finally {
    refreshing = false;
  }
}

function renderNav(activePage) {
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    ...ROUTES.filter((r) => r.nav).map((r) =>
      h("a", { href: `#/${r.page}`, "aria-current": r.page === activePage ? "page" : null }, r.nav),
    ),
  );
}

async function route() {
  if (!session.token) return showLogin();
  const { path, query } = parseHash();
  const found = ROUTES.map((r) => [r, path.match(r.pattern)]).find(([, m]) => m);
  document.getElementById("who").textContent = `${session.name} (${session.role})`;
  document.getElementById("logout").hidden = false;
  if (!found) {
    renderNav(null);
    view().replaceChildren(h("p", { class: "error" }, `no page at ${path}`), h("a", { href: "#/fleet" }, "to the fleet"));
    return;
  }
  const [entry, match] = found;
  renderNav(entry.page);
  const el = h("div", { class: `page page-${entry.page}` });
  view().replaceChildren(el);
  const module = await import(`./pages/${entry.page}.js`);
  const ctx = { params: match.slice(1).map(decodeURIComponent), query, can, setQuery };
  const handle = module.mount(el, ctx);
  current = { hash: location.hash, handle };
  await refresh();
}

function showLogin() {
  current = null;
  document.getElementById("nav").replaceChildren();
  document.getElementById("who").textContent = "";
  document.getElementById("stamp").textContent = "";
  document.getElementById("logout").hidden = true;
  const message = h("p", { class: loginMessage ? "error" : "empty", role: "alert" }, loginMessage || "");
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, name: "token" });
  const form = h(
    "form",
    { class: "login", id: "login" },
    h("h1", {}, "Sign in to the fleet dashboard"),
    h("label", { for: "token" }, "API token"),
    input,
    h("p", { class: "empty" }, "A token from `edgefleet tokens create --name NAME --role viewer` (or operator, approver). ",
      "It stays in this browser tab only (sessionStorage)."),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    try {
      const who = await api("/whoami", { token });
      session.save(token, who);
      loginMessage = "";
      await route();
    } catch (error) {
      message.className = "error";
      message.textContent = `not signed in: ${error.message}`;
    }
  });
  view().replaceChildren(form);
  input.focus();
}

export function logout(message = "") {
  session.clear();
  loginMessage = message;
  showLogin();
}

function start() {
  document.getElementById("logout").addEventListener("click", () => logout("signed out"));
  window.addEventListener("hashchange", () => route());
  timer = setInterval(refresh, POLL_MS);
  route();
}

if (!timer) start();
