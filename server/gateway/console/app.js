// The operator console: devices, device detail (twin, diff, connectivity,
// credentials) and device groups with a live filter builder. Plain modules, no
// build step.

import { ApiError, call, setToken, stream, token } from "./api.js";

const view = document.getElementById("view");
const flash = document.getElementById("flash");
const STATUSES = ["ONLINE", "STALE", "OFFLINE", "UNKNOWN"];
const OPERATORS = ["EXISTS", "DOES_NOT_EXIST", "EQUALS", "NOT_EQUALS", "IN", "NOT_IN"];
const DOCUMENTS = ["REPORTED", "DESIRED"];
const TWIN_OPERATORS = ["EQUALS", "NOT_EQUALS", "LESS", "LESS_OR_EQUAL", "GREATER", "GREATER_OR_EQUAL", "IN",
  "EXISTS", "DOES_NOT_EXIST"];
const SYNC_STATUSES = ["SYNCED", "PENDING", "STALE"];
let cleanup = () => {};

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else if (value !== false && value !== undefined && value !== null) el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function badge(value) {
  return h("span", { class: `badge ${value}` }, value || "—");
}

function when(ts) {
  return ts ? new Date(ts).toLocaleString() : "never";
}

function say(message) {
  flash.textContent = message;
}

function fail(error) {
  say(error instanceof ApiError ? `${error.message} (HTTP ${error.status})` : String(error));
}

function render(...nodes) {
  view.replaceChildren(...nodes);
  view.focus();
}

function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// ---- devices ---------------------------------------------------------------

async function devicesView() {
  const prefix = h("input", { id: "q", type: "search", placeholder: "DEVICE-" });
  const status = h("select", { id: "status" }, h("option", { value: "" }, "any"),
    STATUSES.map((s) => h("option", { value: s }, s)));
  const body = h("tbody");
  const info = h("span", { class: "muted" });
  const prev = h("button", { type: "button", disabled: true }, "Previous");
  const next = h("button", { type: "button", disabled: true }, "Next");
  const tokens = [""];
  let page = 0;

  async function load() {
    try {
      const { data } = await call("GET", "/customer/devices", {
        query: {
          page_size: 25,
          page_token: tokens[page],
          "filter.device_id_prefix": prefix.value.trim(),
          "filter.statuses": status.value,
        },
      });
      say("");
      body.replaceChildren(...data.devices.map((d) => h("tr", {},
        h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id)),
        h("td", {}, d.name), h("td", {}, d.site_id || "—"),
        h("td", {}, badge(d.connectivity_status)), h("td", {}, when(d.last_seen_time)))));
      tokens[page + 1] = data.next_page_token;
      prev.disabled = page === 0;
      next.disabled = !data.next_page_token;
      info.textContent = `page ${page + 1}`;
    } catch (e) { fail(e); }
  }
  const restart = debounce(() => { tokens.length = 1; page = 0; load(); }, 250);
  prefix.addEventListener("input", restart);
  status.addEventListener("change", restart);
  prev.addEventListener("click", () => { page -= 1; load(); });
  next.addEventListener("click", () => { page += 1; load(); });

  render(
    h("h1", {}, "Devices"),
    h("div", { class: "toolbar" },
      h("div", {}, h("label", { for: "q" }, "Device id starts with"), prefix),
      h("div", {}, h("label", { for: "status" }, "Connectivity"), status)),
    h("table", { "aria-label": "Devices" },
      h("thead", {}, h("tr", {}, ["Device", "Name", "Site", "Status", "Last seen"].map((t) => h("th", { scope: "col" }, t)))),
      body),
    h("div", { class: "pager" }, prev, next, info));
  await load();
}

// ---- device detail ----------------------------------------------------------

async function deviceView(deviceId) {
  const path = `/customer/devices/${encodeURIComponent(deviceId)}`;
  let device;
  try {
    device = (await call("GET", path)).data;
  } catch (e) { fail(e); render(h("h1", {}, deviceId)); return; }
  const panels = {
    twin: h("section", {}), diff: h("section", {}), connectivity: h("section", {}), credentials: h("section", {}),
  };
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const stoppers = [];
  function show(name) {
    for (const [key, panel] of Object.entries(panels)) panel.hidden = key !== name;
    for (const button of tabs.children) button.setAttribute("aria-selected", String(button.dataset.tab === name));
    if (name === "diff") diffPanel(deviceId, panels.diff);
  }
  for (const [name, label] of [["twin", "Twin"], ["diff", "Diff"], ["connectivity", "Connectivity"], ["credentials", "Credentials"]]) {
    tabs.append(h("button", { type: "button", role: "tab", "data-tab": name, onclick: () => show(name) }, label));
  }
  render(
    h("h1", {}, device.name ? `${device.device_id} — ${device.name}` : device.device_id),
    h("dl", { class: "kv panel" },
      h("dt", {}, "Status"), h("dd", { id: "device-status" }, badge(device.connectivity_status)),
      h("dt", {}, "Last seen"), h("dd", {}, when(device.last_seen_time)),
      h("dt", {}, "Site"), h("dd", {}, device.site_id || "—"),
      h("dt", {}, "Lifecycle"), h("dd", {}, device.lifecycle_status),
      h("dt", {}, "Tags"), h("dd", {}, Object.entries(device.tags || {}).map(([k, v]) => (v ? `${k}=${v}` : k)).join(", ") || "—")),
    tabs, panels.twin, panels.diff, panels.connectivity, panels.credentials);
  show("twin");
  twinPanel(deviceId, panels.twin);
  credentialsPanel(deviceId, panels.credentials);
  stoppers.push(connectivityPanel(deviceId, panels.connectivity));
  cleanup = () => stoppers.forEach((stop) => stop && stop());
}

function jsonText(value) {
  return JSON.stringify(value ?? {}, null, 2);
}

// Paths whose values differ between two documents, for the conflict message.
function changedPaths(before, after, prefix = "") {
  const out = [];
  const keys = new Set([...Object.keys(before || {}), ...Object.keys(after || {})]);
  for (const key of [...keys].sort()) {
    const path = prefix ? `${prefix}/${key}` : key;
    const a = before?.[key], b = after?.[key];
    if (a && b && typeof a === "object" && typeof b === "object" && !Array.isArray(a) && !Array.isArray(b)) {
      out.push(...changedPaths(a, b, path));
    } else if (JSON.stringify(a) !== JSON.stringify(b)) {
      out.push({ path, before: a, after: b });
    }
  }
  return out;
}

async function twinPanel(deviceId, panel) {
  const path = `/customer/devices/${encodeURIComponent(deviceId)}/twin`;
  const editor = h("textarea", { id: "desired", spellcheck: "false", "aria-describedby": "desired-help" });
  const facts = h("dl", { class: "kv" });
  const conflict = h("div", { class: "panel conflict", hidden: true, role: "alert" });
  const save = h("button", { type: "button", class: "primary" }, "Save desired state");
  let base = null; // the twin the edit started from

  function showTwin(twin) {
    base = twin;
    editor.value = jsonText(twin.desired);
    facts.replaceChildren(
      h("dt", {}, "Desired version"), h("dd", { id: "desired-version", class: "count" }, twin.desired_version),
      h("dt", {}, "Reported version"), h("dd", { class: "count" }, twin.reported_version),
      h("dt", {}, "Sync"), h("dd", { id: "sync-status" }, badge(twin.sync_status)),
      h("dt", {}, "Reported"), h("dd", {}, h("pre", {}, jsonText(twin.reported))));
  }

  async function reload() {
    conflict.hidden = true;
    try { showTwin((await call("GET", path)).data); } catch (e) { fail(e); }
  }

  async function write(document, version) {
    const { data } = await call("PATCH", `${path}/desired`, {
      body: { desired: document }, headers: { "If-Match": `"${version}"` },
    });
    return data;
  }

  save.addEventListener("click", async () => {
    let edited;
    try { edited = JSON.parse(editor.value); } catch (e) { say(`The desired state is not valid JSON: ${e.message}`); return; }
    try {
      showTwin(await write(edited, base.desired_version));
      say(`Saved as version ${base.desired_version}.`);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 409) { fail(error); return; }
      // Someone else wrote first: never overwrite silently.
      const current = (await call("GET", path)).data;
      const theirs = changedPaths(base.desired, current.desired);
      conflict.replaceChildren(
        h("h2", {}, "Someone else changed the desired state"),
        h("p", {}, `You edited version ${base.desired_version}; it is now version ${current.desired_version}. Their changes:`),
        h("table", { class: "diff" }, h("tbody", {}, theirs.map((c) => h("tr", {},
          h("td", {}, c.path), h("td", {}, JSON.stringify(c.before) ?? "—"), h("td", {}, JSON.stringify(c.after) ?? "—"))))),
        h("div", { class: "toolbar" },
          h("button", { type: "button", onclick: reload }, "Reload (discard my edit)"),
          h("button", { type: "button", class: "primary", onclick: async () => {
            try { showTwin(await write(edited, current.desired_version)); conflict.hidden = true; say("Your edit was re-applied."); }
            catch (e) { fail(e); }
          } }, `Re-apply my edit on version ${current.desired_version}`)));
      conflict.hidden = false;
      say("Not saved: the desired state changed meanwhile.");
    }
  });

  panel.replaceChildren(
    h("div", { class: "grid2" },
      h("div", { class: "panel" },
        h("label", { for: "desired" }, "Desired state (JSON)"), editor,
        h("p", { id: "desired-help", class: "muted" }, "Saved with If-Match, so a concurrent change is never overwritten."),
        save),
      h("div", { class: "panel" }, facts)),
    conflict);
  await reload();
}

async function diffPanel(deviceId, panel) {
  try {
    const { data } = await call("GET", `/customer/devices/${encodeURIComponent(deviceId)}/twin/delta`);
    const rows = [
      ...Object.entries(data.added).map(([p, v]) => ["added", p, undefined, v]),
      ...Object.entries(data.removed).map(([p, v]) => ["removed", p, v, undefined]),
      ...Object.entries(data.changed).map(([p, c]) => ["changed", p, c.old_value, c.new_value]),
    ].sort((a, b) => a[1].localeCompare(b[1]));
    panel.replaceChildren(
      h("p", {}, data.in_sync ? "In sync: the device reports what is desired." :
        `${rows.length} difference(s); ${data.unchanged_count} value(s) unchanged. ` +
        `Desired version ${data.desired_version}, device acknowledged ${data.reported_version}.`),
      h("table", { class: "diff", "aria-label": "Desired versus reported" },
        h("thead", {}, h("tr", {}, ["Path", "Kind", "Reported", "Desired"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows.map(([kind, p, old, now]) => h("tr", { class: kind },
          h("td", {}, p), h("td", {}, kind),
          h("td", {}, old === undefined ? "—" : JSON.stringify(old)),
          h("td", {}, now === undefined ? "—" : JSON.stringify(now)))))),
      h("p", { class: "muted" }, `Unchanged: ${data.unchanged_count}`));
  } catch (e) { fail(e); }
}

function eventRow(e) {
  return h("tr", { "data-event-id": e.id },
    h("td", {}, when(e.timestamp)), h("td", {}, badge(e.event_type)),
    h("td", {}, e.previous_status ? `${e.previous_status} → ${e.status}` : e.status),
    h("td", {}, (e.trigger || "").toLowerCase()));
}

function connectivityPanel(deviceId, panel) {
  const body = h("tbody", { id: "timeline" });
  const more = h("button", { type: "button", disabled: true }, "Older events");
  const seen = new Set();
  let nextToken = "";
  async function older() {
    try {
      const { data } = await call("GET", `/customer/devices/${encodeURIComponent(deviceId)}/connections`,
        { query: { limit: 20, page_token: nextToken } });
      for (const e of data.events) {
        if (seen.has(e.id)) continue;
        seen.add(e.id);
        body.append(eventRow(e));
      }
      nextToken = data.next_page_token;
      more.disabled = !nextToken;
    } catch (e) { fail(e); }
  }
  more.addEventListener("click", older);
  panel.replaceChildren(
    h("table", { "aria-label": "Connection events" },
      h("thead", {}, h("tr", {}, ["Time", "Event", "Status", "Trigger"].map((t) => h("th", { scope: "col" }, t)))),
      body),
    h("div", { class: "pager" }, more));
  // Live first, history second: the stream's first message (it opens with
  // its cursor) means it is in place, so nothing can slip between the two.
  let started = false;
  return stream("/customer/connections:watch", { device_ids: deviceId }, (kind, message) => {
    if (!started) { started = true; older(); }
    if (kind !== "message" || !message.event) return;
    const e = message.event;
    if (seen.has(e.id)) return;
    seen.add(e.id);
    body.prepend(eventRow(e));
    document.getElementById("device-status")?.replaceChildren(badge(e.status));
  });
}

// ---- credentials ------------------------------------------------------------

function credentialState(c) {
  if (c.revoke_time) return "REVOKED";
  if (c.expire_time && new Date(c.expire_time) <= new Date()) return "EXPIRED";
  return "ACTIVE";
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function copyButton(label, text) {
  const button = h("button", { type: "button", class: "copy" }, label);
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      say(`${label.replace(/^Copy /, "")} copied.`);
    } catch {
      // No clipboard outside a secure context (plain http to another host).
      say("The browser would not copy; select the text and copy it by hand.");
    }
  });
  return button;
}

function issuedCredential(cred, onDone) {
  // The username is `{tenant}/{device}/{credential}`; the client id is its first two parts.
  const clientId = cred.username.split("/").slice(0, 2).join("/");
  const example = [
    "mosquitto_pub", "-h", shellQuote(location.hostname), "-p", "1883", "-V", "mqttv311",
    "-i", shellQuote(clientId), "-u", shellQuote(cred.username), "-P", shellQuote(cred.secret),
    "-t", shellQuote(`pulse/${clientId}/heartbeat`), "-m", shellQuote("{}"),
  ].join(" ");
  const item = (label, id, value) => [
    h("dt", {}, label),
    h("dd", {}, h("code", { id }, value), " ", copyButton(`Copy ${label.toLowerCase()}`, value)),
  ];
  return h("section", { class: "panel issued", "aria-label": "New credential" },
    h("h2", {}, `Credential ${cred.credential_id} created`),
    h("p", {}, h("strong", {}, "Copy the secret now: it is shown this once. "),
      "The server keeps only a hash of it; if it is lost, create another credential and revoke this one."),
    h("dl", { class: "kv" },
      item("Username", "new-username", cred.username),
      item("Secret", "new-secret", cred.secret),
      item("Client id", "new-client-id", clientId)),
    h("p", { class: "muted" }, "Try it (the broker's host and port may differ from these):"),
    h("pre", { id: "new-example" }, example),
    h("div", { class: "toolbar" },
      copyButton("Copy command", example),
      h("button", { type: "button", onclick: onDone }, "Done: I have stored the secret")));
}

async function credentialsPanel(deviceId, panel) {
  const path = `/customer/devices/${encodeURIComponent(deviceId)}/credentials`;
  const body = h("tbody", { id: "credentials" });
  const issued = h("div", {});
  const expires = h("input", { id: "cred-expires", type: "datetime-local" });
  const create = h("button", { type: "button", class: "primary" }, "Create credential");

  function row(c) {
    const state = credentialState(c);
    const revoke = h("button", { type: "button", "aria-label": `Revoke ${c.credential_id}` }, "Revoke");
    revoke.addEventListener("click", async () => {
      if (!confirm(`Revoke credential ${c.credential_id}? A device connected with it is disconnected and cannot connect with it again.`)) return;
      try {
        await call("POST", `${path}/${encodeURIComponent(c.credential_id)}:revoke`, { body: {} });
        say(`Credential ${c.credential_id} revoked.`);
        await load();
      } catch (e) { fail(e); }
    });
    return h("tr", { "data-credential-id": c.credential_id },
      h("td", {}, h("code", {}, c.credential_id)),
      h("td", { title: c.username }, c.username),
      h("td", {}, when(c.create_time)),
      h("td", {}, c.expire_time ? when(c.expire_time) : "never"),
      h("td", {}, when(c.last_used_time)),
      h("td", {}, badge(state), c.revoke_time ? ` ${when(c.revoke_time)}` : ""),
      h("td", {}, state === "ACTIVE" ? revoke : ""));
  }

  async function load() {
    try {
      const { data } = await call("GET", path);
      const credentials = data.credentials || [];
      body.replaceChildren(...credentials.map(row));
      if (!credentials.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No credentials yet.")));
    } catch (e) { fail(e); }
  }

  create.addEventListener("click", async () => {
    const request = {};
    if (expires.value) request.expire_time = new Date(expires.value).toISOString();
    try {
      const { data } = await call("POST", path, { body: request });
      expires.value = "";
      // Only in this node: forgotten on Done, on leaving the page, on reload.
      issued.replaceChildren(issuedCredential(data, () => issued.replaceChildren()));
      say("");
      await load();
    } catch (e) { fail(e); }
  });

  panel.replaceChildren(
    issued,
    h("table", { class: "creds", "aria-label": "Credentials" },
      h("thead", {}, h("tr", {}, ["Credential", "Username", "Created", "Expires", "Last used", "State", ""]
        .map((t) => h("th", { scope: "col" }, t)))),
      body),
    h("div", { class: "toolbar" },
      h("div", {}, h("label", { for: "cred-expires" }, "Expires (optional, local time)"), expires),
      create),
    h("p", { class: "muted" },
      "A device connects with the username, the secret as password and the client id {tenant}/{device}. " +
      "It may hold two active credentials, so it can rotate: create the second, switch over, revoke the first."));
  await load();
}

// ---- groups -----------------------------------------------------------------

// A twin value as typed: JSON null, true, false, a number or a "string" is
// that value; any other text is the string itself (2.4 is a number, "2.4" and
// v2.4 are strings).
function twinValue(text) {
  const item = text.trim();
  try {
    const parsed = JSON.parse(item);
    if (parsed === null || typeof parsed === "boolean" || typeof parsed === "string") return parsed;
    if (typeof parsed === "number" && Number.isFinite(parsed)) return parsed;
  } catch { /* not JSON: the text itself */ }
  return item;
}

// Splits IN's values at commas outside "double-quoted" strings, so "a,b" is one item.
function twinItems(text) {
  const items = [];
  let item = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted && c === "\\" && i + 1 < text.length) { item += c + text[++i]; continue; }
    if (c === '"') quoted = !quoted;
    if (c === "," && !quoted) { items.push(item); item = ""; } else item += c;
  }
  items.push(item);
  return items.filter((s) => s.trim()).map(twinValue);
}

const TWIN_VALUE_HELP = 'JSON null, true, false or a number is that value; "quoted" text is a string; ' +
  "anything else is a string as typed (2.4 is a number, \"2.4\" and v2.4 are strings). IN: comma separated.";

function filterBuilder(onChange) {
  const statuses = STATUSES.map((s) => h("label", {}, h("input", { type: "checkbox", value: s, onchange: onChange }), ` ${s} `));
  const syncs = SYNC_STATUSES.map((s) => h("label", {},
    h("input", { type: "checkbox", value: s, "aria-label": `Sync status ${s}`, onchange: onChange }), ` ${s} `));
  const sites = h("input", { id: "f-sites", placeholder: "site-01, site-02", oninput: onChange });
  const prefix = h("input", { id: "f-prefix", placeholder: "DEVICE-", oninput: onChange });
  const rows = h("div", {});
  function addSelector() {
    const key = h("input", { placeholder: "key", "aria-label": "Tag key", oninput: onChange });
    const op = h("select", { "aria-label": "Operator", onchange: onChange }, OPERATORS.map((o) => h("option", { value: o }, o)));
    const values = h("input", { placeholder: "values, comma separated", "aria-label": "Tag values", oninput: onChange });
    const remove = h("button", { type: "button", "aria-label": "Remove selector" }, "×");
    const row = h("div", { class: "selector" }, key, op, values, remove);
    remove.addEventListener("click", () => { row.remove(); onChange(); });
    rows.append(row);
  }

  // Path suggestions from the fleet, one <datalist> per document, fetched
  // once each; without them (an error, an older server) paths are typed.
  const pathLists = Object.fromEntries(DOCUMENTS.map((d) => [d, h("datalist", { id: `twin-paths-${d}` })]));
  const fetched = {};
  function suggestPaths(doc) {
    if (fetched[doc]) return;
    fetched[doc] = call("GET", "/customer/twin-paths", { query: { document: doc } })
      .then(({ data }) => pathLists[doc].replaceChildren(...(data.paths || []).map((p) => h("option", { value: p }))))
      .catch(() => { delete fetched[doc]; });
  }
  const twinRows = h("div", {});
  function addTwinCondition() {
    const doc = h("select", { "aria-label": "Twin document" }, DOCUMENTS.map((d) => h("option", { value: d }, d)));
    const path = h("input", { placeholder: "path, e.g. fw.version", "aria-label": "Twin path", list: "twin-paths-REPORTED",
      title: "Object keys separated by dots; a literal dot in a key is \\., a backslash \\\\", oninput: onChange });
    const op = h("select", { "aria-label": "Twin operator" }, TWIN_OPERATORS.map((o) => h("option", { value: o }, o)));
    const values = h("input", { "aria-label": "Twin value", title: TWIN_VALUE_HELP, oninput: onChange });
    const remove = h("button", { type: "button", "aria-label": "Remove twin condition" }, "×");
    function shape() {
      const none = op.value === "EXISTS" || op.value === "DOES_NOT_EXIST";
      values.disabled = none;
      values.placeholder = none ? "no value" : op.value === "IN" ? 'values, comma separated: 1, true, "a,b"' : 'value: 2.4 or "2.4"';
    }
    doc.addEventListener("change", () => {
      path.setAttribute("list", `twin-paths-${doc.value}`);
      suggestPaths(doc.value);
      onChange();
    });
    op.addEventListener("change", () => { shape(); onChange(); });
    shape();
    const row = h("div", { class: "selector twin" }, doc, path, op, values, remove);
    remove.addEventListener("click", () => { row.remove(); onChange(); });
    twinRows.append(row);
    path.focus();
  }
  suggestPaths("REPORTED");

  const node = h("fieldset", { class: "panel" }, h("legend", {}, "Filter"),
    h("div", { class: "field" }, h("span", { class: "muted" }, "Connectivity: "), statuses),
    h("div", { class: "toolbar" },
      h("div", {}, h("label", { for: "f-sites" }, "Sites (any of)"), sites),
      h("div", {}, h("label", { for: "f-prefix" }, "Device id starts with"), prefix)),
    h("div", {}, h("span", { class: "muted" }, "Tag selectors (all must hold)"), rows,
      h("button", { type: "button", onclick: addSelector }, "Add tag selector")),
    h("div", { class: "twin-conditions" }, h("span", { class: "muted" }, "Twin conditions (all must hold)"), twinRows,
      h("button", { type: "button", onclick: addTwinCondition }, "Add twin condition"),
      Object.values(pathLists)),
    h("div", { class: "field" }, h("span", { class: "muted" }, "Twin sync status: "), syncs));
  function value() {
    const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
    const filter = {};
    const chosen = statuses.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (chosen.length) filter.statuses = chosen;
    if (list(sites.value).length) filter.site_ids = list(sites.value);
    if (prefix.value.trim()) filter.device_id_prefix = prefix.value.trim();
    const selectors = [...rows.children].map((row) => {
      const [key, op, values] = row.querySelectorAll("input, select");
      const s = { key: key.value.trim(), operator: op.value };
      if (list(values.value).length) s.values = list(values.value);
      return s;
    }).filter((s) => s.key);
    if (selectors.length) filter.tag_selectors = selectors;
    const conditions = [...twinRows.children].map((row) => {
      const [doc, path, op, values] = row.querySelectorAll("input, select");
      const c = { document: doc.value, path: path.value.trim(), operator: op.value };
      if (!values.disabled && values.value.trim()) {
        c.values = op.value === "IN" ? twinItems(values.value) : [twinValue(values.value)];
      }
      return c;
    }).filter((c) => c.path);
    if (conditions.length) filter.twin_conditions = conditions;
    const sync = syncs.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (sync.length) filter.sync_statuses = sync;
    return filter;
  }
  return { node, value };
}

async function groupsView() {
  const list = h("tbody");
  const name = h("input", { id: "g-name", placeholder: "Online devices at plant 7", required: true });
  const count = h("strong", { id: "preview-count", class: "count" }, "…");
  const preview = h("tbody", { id: "preview" });
  const problem = h("p", { class: "muted", role: "status" });
  const builder = filterBuilder(debounce(refresh, 250));

  async function refresh() {
    try {
      const { data } = await call("POST", "/customer/device-groups:preview",
        { body: { query_filter: builder.value(), include_total: true, page_size: 10 } });
      problem.textContent = "";
      count.textContent = data.total ?? data.members.length;
      preview.replaceChildren(...data.members.map((m) => h("tr", {},
        h("td", {}, m.device_id), h("td", {}, m.name), h("td", {}, badge(m.status)), h("td", {}, m.site_id || "—"))));
    } catch (e) {
      count.textContent = "—";
      problem.textContent = e.message;
    }
  }
  async function loadGroups() {
    try {
      const { data } = await call("GET", "/customer/device-groups", { query: { page_size: 100 } });
      list.replaceChildren(...data.groups.map((g) => h("tr", {},
        h("td", {}, h("a", { href: `#/groups/${g.group_id}` }, g.name)), h("td", {}, g.group_type),
        h("td", { class: "count" }, g.member_count ?? "—"))));
    } catch (e) { fail(e); }
  }
  const create = h("button", { type: "button", class: "primary" }, "Create dynamic group");
  create.addEventListener("click", async () => {
    if (!name.value.trim()) { say("Give the group a name."); name.focus(); return; }
    try {
      await call("POST", "/customer/device-groups/dynamic", { body: { name: name.value.trim(), query_filter: builder.value() } });
      say(`Created “${name.value.trim()}”.`);
      name.value = "";
      loadGroups();
    } catch (e) { fail(e); }
  });
  render(
    h("h1", {}, "Device groups"),
    h("table", { "aria-label": "Groups" },
      h("thead", {}, h("tr", {}, ["Name", "Type", "Members"].map((t) => h("th", { scope: "col" }, t)))), list),
    h("h2", {}, "New dynamic group"),
    h("div", { class: "field" }, h("label", { for: "g-name" }, "Name"), name),
    builder.node,
    h("p", {}, "Matching devices: ", count), problem,
    h("table", { "aria-label": "Preview" },
      h("thead", {}, h("tr", {}, ["Device", "Name", "Status", "Site"].map((t) => h("th", { scope: "col" }, t)))), preview),
    h("div", { class: "pager" }, create));
  loadGroups();
  refresh();
}

async function groupView(groupId) {
  const body = h("tbody");
  const total = h("span", { class: "count" });
  const more = h("button", { type: "button", disabled: true }, "More");
  let token = "";
  async function load(first) {
    try {
      const { data } = await call("GET", `/customer/device-groups/${groupId}/members`,
        { query: { page_size: 50, page_token: token, include_total: first } });
      if (first) total.textContent = `${data.total} member(s)`;
      body.append(...data.members.map((m) => h("tr", {},
        h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(m.device_id)}` }, m.device_id)),
        h("td", {}, m.name), h("td", {}, badge(m.status)), h("td", {}, m.site_id || "—"))));
      token = data.next_page_token;
      more.disabled = !token;
    } catch (e) { fail(e); }
  }
  more.addEventListener("click", () => load(false));
  const group = (await call("GET", `/customer/device-groups/${groupId}`).catch(fail))?.data;
  render(h("h1", {}, group ? group.name : groupId), h("p", {}, total),
    group?.query_filter ? h("pre", {}, jsonText(group.query_filter)) : null,
    h("table", { "aria-label": "Members" },
      h("thead", {}, h("tr", {}, ["Device", "Name", "Status", "Site"].map((t) => h("th", { scope: "col" }, t)))), body),
    h("div", { class: "pager" }, more));
  load(true);
}

// ---- routing ----------------------------------------------------------------

function route() {
  cleanup();
  cleanup = () => {};
  say("");
  const hash = location.hash.replace(/^#/, "") || "/devices";
  const params = new URLSearchParams(hash.startsWith("token=") ? hash : "");
  if (params.get("token")) {
    setToken(params.get("token"));
    location.replace("#/devices");
    return;
  }
  const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.toggleAttribute("aria-current", link.dataset.nav === parts[0]);
    if (link.dataset.nav === parts[0]) link.setAttribute("aria-current", "page");
  }
  if (!token()) { say("Paste a bearer token (pulse token) to start."); render(h("h1", {}, "Pulse")); return; }
  if (parts[0] === "devices" && parts[1]) deviceView(parts[1]);
  else if (parts[0] === "groups" && parts[1]) groupView(parts[1]);
  else if (parts[0] === "groups") groupsView();
  else devicesView();
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  setToken(input.value);
  input.value = "";
  route();
});
window.addEventListener("hashchange", route);
route();
