// The operator console: devices, device detail (twin, diff, connectivity,
// credentials), device groups with a live filter builder, and rollouts (started
// from a group's page, listed, followed live). Plain modules, no build step.

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
  const rollouts = groupRollouts(groupId);
  render(h("h1", {}, group ? group.name : groupId), h("p", {}, total),
    group?.query_filter ? h("pre", {}, jsonText(group.query_filter)) : null,
    h("table", { "aria-label": "Members" },
      h("thead", {}, h("tr", {}, ["Device", "Name", "Status", "Site"].map((t) => h("th", { scope: "col" }, t)))), body),
    h("div", { class: "pager" }, more),
    h("h2", {}, "Rollouts"), rollouts.node,
    h("h2", {}, "New rollout"), rolloutForm(groupId, group));
  load(true);
  rollouts.load(true);
}

// ---- rollouts ---------------------------------------------------------------

const LIVE_ROLLOUT_STATES = ["RUNNING", "PAUSED"];
// A rollout's counts as the progress bar shows them, left to right: outcomes,
// then devices written and waiting for one, then those not started.
const ROLLOUT_COUNTS = [
  ["succeeded", "SUCCEEDED", "Succeeded"], ["failed", "FAILED", "Failed"], ["timed_out", "TIMED_OUT", "Timed out"],
  ["superseded", "SUPERSEDED", "Superseded"], ["skipped", "SKIPPED", "Skipped"],
  ["applied", "APPLIED", "Applied, waiting"], ["pending", "PENDING", "Pending"],
];
const ROLLOUT_DEVICE_STATES = ["PENDING", "APPLIED", "SUCCEEDED", "FAILED", "TIMED_OUT", "SKIPPED", "SUPERSEDED"];
const ROLLOUT_POLL_MS = 2000;

function rolloutHref(rolloutId) {
  return `#/rollouts/${encodeURIComponent(rolloutId)}`;
}

// Counts are int64: proto3 JSON may spell them as strings.
function countOf(counts, key) {
  return Number(counts?.[key] ?? 0) || 0;
}

function countsTotal(counts) {
  return ROLLOUT_COUNTS.reduce((sum, [key]) => sum + countOf(counts, key), 0);
}

function countsKey(counts) {
  return ROLLOUT_COUNTS.map(([key]) => countOf(counts, key)).join();
}

function countsSummary(counts) {
  const total = countsTotal(counts);
  if (!total) return "no devices";
  const parts = ROLLOUT_COUNTS.filter(([key]) => countOf(counts, key))
    .map(([key, , label]) => `${countOf(counts, key)} ${label.split(",")[0].toLowerCase()}`);
  return `${parts.join(", ")} (of ${total})`;
}

function progressBar(counts, { mini = false } = {}) {
  const total = countsTotal(counts);
  return h("div", { class: mini ? "progress mini" : "progress", role: "img", "aria-label": `Progress: ${countsSummary(counts)}` },
    ROLLOUT_COUNTS.filter(([key]) => countOf(counts, key)).map(([key, state, label]) => h("span", {
      class: `seg ${state}`, "data-state": state, title: `${label}: ${countOf(counts, key)}`,
      style: `width: ${((100 * countOf(counts, key)) / total).toFixed(3)}%`,
    })));
}

// A filter without the fields left at their defaults, for display.
function filterShown(filter) {
  return Object.fromEntries(Object.entries(filter || {}).filter(([, value]) =>
    value !== "" && value !== false && value !== null && value !== "CONNECTIVITY_STATUS_UNSPECIFIED" &&
    !(Array.isArray(value) && !value.length) &&
    !(typeof value === "object" && !Array.isArray(value) && !Object.keys(value).length)));
}

function rolloutTarget(r, groupNames = {}) {
  if (r.target_group_id) {
    return h("a", { href: `#/groups/${encodeURIComponent(r.target_group_id)}` },
      groupNames[r.target_group_id] || r.target_group_id);
  }
  const shown = filterShown(r.target_filter);
  const text = Object.keys(shown).length ? JSON.stringify(shown) : "every active device";
  return h("span", { title: text }, `filter: ${text}`);
}

function rolloutRow(r, { groupNames = {}, target = true } = {}) {
  return h("tr", { "data-rollout-id": r.rollout_id },
    h("td", { title: r.rollout_id }, h("a", { href: rolloutHref(r.rollout_id) }, r.description || r.rollout_id)),
    h("td", { title: r.state_reason || "" }, badge(r.state)),
    target ? h("td", {}, rolloutTarget(r, groupNames)) : null,
    h("td", { class: "count", title: countsSummary(r.counts) }, progressBar(r.counts, { mini: true }), countsSummary(r.counts)),
    h("td", {}, when(r.create_time)));
}

function rolloutsHead(target) {
  return h("thead", {}, h("tr", {},
    ["Rollout", "State", target ? "Target" : null, "Devices", "Created"].filter(Boolean).map((t) => h("th", { scope: "col" }, t))));
}

async function groupNamesById() {
  try {
    const { data } = await call("GET", "/customer/device-groups", { query: { page_size: 100 } });
    return Object.fromEntries((data.groups || []).map((g) => [g.group_id, g.name]));
  } catch { return {}; } // names are a nicety: ids are shown instead
}

function groupRollouts(groupId) {
  const body = h("tbody", { id: "group-rollouts" });
  const more = h("button", { type: "button", disabled: true }, "More rollouts");
  let pageToken = "";
  async function load(first) {
    try {
      if (first) pageToken = "";
      const { data } = await call("GET", "/customer/rollouts",
        { query: { target_group_id: groupId, page_size: 10, page_token: pageToken } });
      const rollouts = data.rollouts || [];
      if (first) body.replaceChildren();
      body.append(...rollouts.map((r) => rolloutRow(r, { target: false })));
      if (first && !rollouts.length) body.append(h("tr", {}, h("td", { colspan: 4, class: "muted" }, "No rollouts to this group yet.")));
      pageToken = data.next_page_token;
      more.disabled = !pageToken;
    } catch (e) { fail(e); }
  }
  more.addEventListener("click", () => load(false));
  const node = h("div", {},
    h("table", { "aria-label": "Rollouts of this group", class: "rollouts" }, rolloutsHead(false), body),
    h("div", { class: "pager" }, more));
  return { node, load };
}

// The new-rollout form of a group's page. Problems found here and the
// server's field violations are both shown beside their fields.
function rolloutForm(groupId, group) {
  const input = (id, attrs = {}) => h("input", { id, ...attrs });
  const patch = h("textarea", { id: "r-patch", spellcheck: "false", class: "short",
    placeholder: '{"firmware": {"version": "2.4"}}' });
  const rate = input("r-rate", { type: "number", min: 0, step: 1, value: 50 });
  const canaries = input("r-canaries", { type: "number", min: 0, step: 1, value: 5 });
  const timeout = input("r-timeout", { type: "number", min: 1, step: 1, value: 900 });
  const abortPercent = input("r-abort-percent", { type: "number", min: 0, max: 100, step: "any", placeholder: "never abort" });
  const abortMin = input("r-abort-min", { type: "number", min: 0, step: 1, value: 10 });
  const failurePath = input("r-failure-path", { placeholder: "firmware.error" });
  const continuous = input("r-continuous", { type: "checkbox" });
  const description = input("r-description", { placeholder: "Firmware 2.4" });
  const others = h("ul", { id: "r-errors", class: "field-error", hidden: true });
  const submit = h("button", { type: "submit", class: "primary" }, "Start rollout");

  // Request field (below `rollout.`) -> its input, label and error line.
  const fields = {};
  function field(name, label, control, help = "") {
    const error = h("p", { id: `${control.id}-error`, class: "field-error", hidden: true });
    const helpLine = help ? h("p", { id: `${control.id}-help`, class: "muted hint" }, help) : null;
    control.setAttribute("aria-describedby", [helpLine && helpLine.id, error.id].filter(Boolean).join(" "));
    fields[name] = { control, error };
    if (control.type === "checkbox") {
      return h("div", { class: "field" }, h("label", { class: "check" }, control, ` ${label}`), helpLine, error);
    }
    return h("div", { class: "field" }, h("label", { for: control.id }, label), control, helpLine, error);
  }

  function clearErrors() {
    for (const { control, error } of Object.values(fields)) {
      control.removeAttribute("aria-invalid");
      error.hidden = true;
      error.textContent = "";
    }
    others.hidden = true;
    others.replaceChildren();
  }

  // violations: [{field, description}], field a request path below `rollout.`;
  // a violation of a nested path (patch.a.b) belongs to its field (patch).
  function showErrors(violations) {
    let first = null;
    for (const v of violations) {
      const name = Object.keys(fields).find((f) => v.field === f || v.field.startsWith(`${f}.`));
      if (!name) {
        others.append(h("li", {}, `${v.field}: ${v.description}`));
        others.hidden = false;
        continue;
      }
      const { control, error } = fields[name];
      control.setAttribute("aria-invalid", "true");
      error.textContent = error.textContent ? `${error.textContent}; ${v.description}` : v.description;
      error.hidden = false;
      first = first || control;
    }
    first?.focus();
  }

  // The Rollout to send, or the problems that keep it from being sent.
  function build() {
    const problems = [];
    const rollout = { target_group_id: groupId, strategy: {}, continuous: continuous.checked };
    let parsed;
    try {
      parsed = JSON.parse(patch.value);
    } catch (e) {
      problems.push({ field: "patch", description: `is not valid JSON: ${e.message}` });
    }
    if (parsed !== undefined) {
      if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
        problems.push({ field: "patch", description: 'must be a JSON object, such as {"firmware": {"version": "2.4"}}' });
      } else if (!Object.keys(parsed).length) {
        problems.push({ field: "patch", description: "is empty: set at least one key (null removes a key)" });
      } else {
        rollout.patch = parsed;
      }
    }
    function number(name, control, { whole = true } = {}) {
      if (control.validity.badInput) { problems.push({ field: name, description: "is not a number" }); return undefined; }
      const text = control.value.trim();
      if (text === "") return undefined;
      const value = Number(text);
      if (whole && !Number.isInteger(value)) { problems.push({ field: name, description: "must be a whole number" }); return undefined; }
      return value;
    }
    const perMinute = number("strategy.max_per_minute", rate);
    if (perMinute !== undefined) rollout.strategy.max_per_minute = perMinute;
    const canaryCount = number("strategy.canary_count", canaries);
    if (canaryCount !== undefined) rollout.strategy.canary_count = canaryCount;
    const seconds = number("strategy.device_timeout", timeout);
    if (seconds !== undefined) rollout.strategy.device_timeout = `${seconds}s`;
    const percent = number("abort_threshold_percent", abortPercent, { whole: false });
    if (percent !== undefined) rollout.abort_threshold_percent = percent;
    const minCount = number("abort_min_count", abortMin);
    if (minCount !== undefined) rollout.abort_min_count = minCount;
    if (failurePath.value.trim()) rollout.failure_path = failurePath.value.trim();
    if (description.value.trim()) rollout.description = description.value.trim();
    return { rollout, problems };
  }

  const members = group ? Number(group.member_count ?? 0) : null;
  const targets = h("p", { id: "rollout-targets" }, "Targets ",
    h("strong", { class: "count" }, members ?? "—"), members === 1 ? " device" : " devices");
  const later = h("span", { class: "muted" });
  targets.append(later);
  continuous.addEventListener("change", () => {
    later.textContent = continuous.checked ? " now, and every device that joins the group later" : "";
  });

  const form = h("form", { class: "panel rollout-form", "aria-label": "New rollout", novalidate: true },
    field("description", "Description", description),
    field("patch", "Patch (a JSON merge patch of the desired state)", patch,
      "Keys set here are merged into each device's desired state; null removes a key."),
    h("fieldset", {}, h("legend", {}, "Strategy"),
      h("div", { class: "form-grid" },
        field("strategy.max_per_minute", "Max devices per minute", rate, "0: as fast as possible"),
        field("strategy.canary_count", "Canary devices", canaries, "Started first; the rest wait until all succeed"),
        field("strategy.device_timeout", "Device timeout (seconds)", timeout, "From the write to reporting the patch"))),
    h("fieldset", {}, h("legend", {}, "Abort rule"),
      h("div", { class: "form-grid" },
        field("abort_threshold_percent", "Abort above % failed or timed out", abortPercent, "Empty: never abort"),
        field("abort_min_count", "Minimum outcomes before aborting", abortMin),
        field("failure_path", "Failure path (reported)", failurePath, "A non-null value there marks the device failed"))),
    field("continuous", "Continuous: also devices that join the group later", continuous),
    targets, others, h("div", { class: "pager" }, submit));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const { rollout, problems } = build();
    if (problems.length) {
      say("Not started: see the fields marked below.");
      showErrors(problems);
      return;
    }
    submit.disabled = true;
    try {
      const { data } = await call("POST", "/customer/rollouts", { body: rollout });
      location.hash = rolloutHref(data.rollout_id);
    } catch (e) {
      fail(e);
      if (e instanceof ApiError) {
        showErrors(e.violations.map((v) => ({ field: v.field.replace(/^rollout\./, ""), description: v.description })));
      }
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

async function rolloutsView() {
  const body = h("tbody", { id: "rollouts" });
  const info = h("span", { class: "muted" });
  const prev = h("button", { type: "button", disabled: true }, "Previous");
  const next = h("button", { type: "button", disabled: true }, "Next");
  const tokens = [""];
  let page = 0;
  let groupNames = {};

  async function load() {
    try {
      const { data } = await call("GET", "/customer/rollouts", { query: { page_size: 25, page_token: tokens[page] } });
      const rollouts = data.rollouts || [];
      body.replaceChildren(...rollouts.map((r) => rolloutRow(r, { groupNames })));
      if (!rollouts.length && page === 0) {
        body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No rollouts yet: start one from a device group's page.")));
      }
      tokens[page + 1] = data.next_page_token;
      prev.disabled = page === 0;
      next.disabled = !data.next_page_token;
      info.textContent = `page ${page + 1}`;
    } catch (e) { fail(e); }
  }
  prev.addEventListener("click", () => { page -= 1; load(); });
  next.addEventListener("click", () => { page += 1; load(); });

  render(
    h("h1", {}, "Rollouts"),
    h("p", { class: "muted" }, "Newest first. A rollout is started from a device group's page."),
    h("table", { "aria-label": "Rollouts", class: "rollouts" }, rolloutsHead(true), body),
    h("div", { class: "pager" }, prev, next, info));
  groupNames = await groupNamesById();
  await load();
}

function strategyText(s = {}) {
  const rate = Number(s.max_per_minute || 0);
  const canaries = Number(s.canary_count || 0);
  return [
    rate ? `at most ${rate} device(s) a minute` : "no rate limit",
    canaries ? `${canaries} canary device(s) first` : "no canaries",
    `device timeout ${s.device_timeout || "900s (default)"}`,
  ].join("; ");
}

function abortText(r) {
  if (r.abort_threshold_percent === undefined || r.abort_threshold_percent === null) return "never aborts";
  return `above ${r.abort_threshold_percent}% failed or timed out, from ${Math.max(Number(r.abort_min_count || 0), 1)} outcome(s) on`;
}

async function rolloutView(rolloutId) {
  const getRollout = () => call("GET", `/customer/rollouts/${encodeURIComponent(rolloutId)}`);
  let left = false;
  let timer = 0;
  let current = null;
  // Set before the first await, so leaving while it loads stops it too.
  cleanup = () => { left = true; clearTimeout(timer); };

  let rollout;
  try {
    rollout = (await getRollout()).data;
  } catch (e) {
    if (!left) { fail(e); render(h("h1", {}, `Rollout ${rolloutId}`)); }
    return;
  }
  if (left) return;
  const groupNames = {};
  if (rollout.target_group_id) {
    const group = (await call("GET", `/customer/device-groups/${encodeURIComponent(rollout.target_group_id)}`)
      .catch(() => null))?.data;
    if (group) groupNames[group.group_id] = group.name;
    if (left) return;
  }

  const state = h("p", { id: "rollout-state" });
  const facts = h("dl", { class: "kv" });
  const bar = h("div", { id: "rollout-progress" });
  const legend = h("ul", { class: "legend", "aria-label": "Counts" });
  const pause = h("button", { type: "button", hidden: true }, "Pause");
  const resume = h("button", { type: "button", class: "primary", hidden: true }, "Resume");
  const cancel = h("button", { type: "button", hidden: true }, "Cancel rollout");

  function update(r) {
    current = r;
    state.replaceChildren(badge(r.state), r.state_reason ? ` ${r.state_reason}` : "");
    pause.hidden = r.state !== "RUNNING";
    resume.hidden = r.state !== "PAUSED";
    cancel.hidden = !LIVE_ROLLOUT_STATES.includes(r.state);
    bar.replaceChildren(progressBar(r.counts));
    legend.replaceChildren(...ROLLOUT_COUNTS.map(([key, st, label]) => h("li", {},
      h("span", { class: `swatch ${st}` }), `${label} `, h("strong", { id: `count-${key}`, class: "count" }, countOf(r.counts, key)))));
    facts.replaceChildren(
      h("dt", {}, "Target"), h("dd", {}, rolloutTarget(r, groupNames)),
      h("dt", {}, "Patch"), h("dd", {}, h("pre", { id: "rollout-patch" }, jsonText(r.patch))),
      h("dt", {}, "Strategy"), h("dd", {}, strategyText(r.strategy)),
      h("dt", {}, "Abort rule"), h("dd", {}, abortText(r)),
      h("dt", {}, "Failure path"), h("dd", {}, r.failure_path || "—"),
      h("dt", {}, "Continuous"), h("dd", {}, r.continuous ? "yes: also devices that join the target later" : "no"),
      h("dt", {}, "Created"), h("dd", {}, when(r.create_time), r.created_by ? ` by ${r.created_by}` : ""),
      h("dt", {}, "Updated"), h("dd", {}, when(r.update_time)),
      h("dt", {}, "Ended"), h("dd", {}, r.end_time ? when(r.end_time) : "—"));
  }

  // Polled while it is running or paused, or devices still wait for an outcome.
  function schedule() {
    clearTimeout(timer);
    if (left || !current) return;
    if (!LIVE_ROLLOUT_STATES.includes(current.state) && countOf(current.counts, "applied") === 0) return;
    timer = setTimeout(poll, ROLLOUT_POLL_MS);
  }
  async function poll() {
    if (left) return;
    try {
      const { data } = await getRollout();
      if (left) return;
      const changed = countsKey(data.counts) !== countsKey(current?.counts);
      update(data);
      if (changed) await loadDevices();
    } catch (e) {
      if (left) return;
      fail(e);
      if (e instanceof ApiError && e.status < 500 && e.status !== 429) return; // it will not get better by itself
    }
    schedule();
  }

  async function act(done, send) {
    try {
      const { data } = await send();
      if (left) return;
      update(data);
      say(done);
      schedule();
    } catch (e) { fail(e); }
  }
  pause.addEventListener("click", () => act("Rollout paused: no device is started until it is resumed.",
    () => call("POST", `/customer/rollouts/${encodeURIComponent(rolloutId)}:pause`, { body: {} })));
  resume.addEventListener("click", () => act("Rollout resumed.",
    () => call("POST", `/customer/rollouts/${encodeURIComponent(rolloutId)}:resume`, { body: {} })));
  cancel.addEventListener("click", () => {
    if (!confirm(`Cancel rollout ${rollout.description || rolloutId}? No device is started any more; ` +
      "devices already written keep their desired state. A cancelled rollout cannot be resumed.")) return;
    act("Rollout cancelled.",
      () => call("POST", `/customer/rollouts/${encodeURIComponent(rolloutId)}:cancel`, { body: {} }));
  });

  // Devices, in device_id order, a page at a time (keyset: next_page_token).
  const devices = h("tbody", { id: "rollout-devices" });
  const prev = h("button", { type: "button", disabled: true }, "Previous");
  const next = h("button", { type: "button", disabled: true }, "Next");
  const info = h("span", { class: "muted" });
  const stateBoxes = ROLLOUT_DEVICE_STATES.map((s) => h("label", {},
    h("input", { type: "checkbox", value: s, "aria-label": `Device state ${s}` }), ` ${s} `));
  const tokens = [""];
  let page = 0;
  let loads = 0;
  async function loadDevices() {
    const mine = ++loads;
    const states = stateBoxes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    try {
      const { data } = await call("GET", `/customer/rollouts/${encodeURIComponent(rolloutId)}/devices`,
        { query: { page_size: 20, page_token: tokens[page], states } });
      if (left || mine !== loads) return; // a newer load (or another view) took over
      const rows = data.devices || [];
      devices.replaceChildren(...rows.map((d) => h("tr", { "data-device-id": d.device_id },
        h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id)),
        h("td", {}, badge(d.state), d.canary ? h("span", { class: "muted" }, " canary") : null),
        h("td", { class: "count" }, Number(d.desired_version || 0) || "—"),
        h("td", { title: d.detail || "" }, d.detail || "—"),
        h("td", {}, d.apply_time ? when(d.apply_time) : "—"),
        h("td", {}, d.end_time ? when(d.end_time) : "—"))));
      if (!rows.length) {
        devices.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, states.length ? "No devices in these states." : "No devices.")));
      }
      tokens[page + 1] = data.next_page_token;
      prev.disabled = page === 0;
      next.disabled = !data.next_page_token;
      info.textContent = `page ${page + 1}`;
    } catch (e) { if (!left) fail(e); }
  }
  for (const box of stateBoxes) {
    box.querySelector("input").addEventListener("change", () => { tokens.length = 1; page = 0; loadDevices(); });
  }
  prev.addEventListener("click", () => { page -= 1; loadDevices(); });
  next.addEventListener("click", () => { page += 1; loadDevices(); });

  render(
    h("h1", {}, rollout.description ? `Rollout: ${rollout.description}` : `Rollout ${rollout.rollout_id}`),
    h("p", { class: "muted" }, h("code", {}, rollout.rollout_id)),
    state,
    h("div", { class: "toolbar" }, pause, resume, cancel),
    h("section", { class: "panel", "aria-label": "Progress" }, bar, legend),
    h("div", { class: "panel" }, facts),
    h("h2", {}, "Devices"),
    h("fieldset", { class: "toolbar states" }, h("legend", {}, "Only devices in these states (none: all)"), stateBoxes),
    h("table", { "aria-label": "Rollout devices", class: "rollout-devices" },
      h("thead", {}, h("tr", {}, ["Device", "State", "Desired version", "Detail", "Applied", "Ended"]
        .map((t) => h("th", { scope: "col" }, t)))),
      devices),
    h("div", { class: "pager" }, prev, next, info));
  update(rollout);
  await loadDevices();
  schedule();
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
  else if (parts[0] === "rollouts" && parts[1]) rolloutView(parts[1]);
  else if (parts[0] === "rollouts") rolloutsView();
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
