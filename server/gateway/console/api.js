// The gateway's JSON API, with the bearer token and AIP-193 errors.

const TOKEN_KEY = "pulse.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value.trim());
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.reason = (error.details || []).find((d) => d.reason)?.reason || "";
    this.metadata = (error.details || []).find((d) => d.reason)?.metadata || {};
    this.details = error.details || [];
    // A BadRequest detail's field violations: [{field, description}], the
    // field named by its request path (e.g. "rollout.strategy.canary_count").
    this.violations = this.details
      .filter((d) => String(d["@type"] || "").endsWith("google.rpc.BadRequest"))
      .flatMap((d) => d.field_violations || []);
  }
}

export async function call(method, path, { query, body, headers } = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    for (const item of [].concat(value)) {
      if (item !== undefined && item !== null && item !== "") url.searchParams.append(key, item);
    }
  }
  const response = await fetch(url, {
    method,
    headers: {
      Authorization: `Bearer ${token()}`,
      ...(body !== undefined ? { "Content-Type": "application/json" } : {}),
      ...(headers || {}),
    },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, etag: response.headers.get("ETag") };
}

// Server-sent events over fetch (EventSource cannot send an Authorization
// header); reconnects with Last-Event-ID so nothing is missed or repeated.
export function stream(path, query, onEvent, { lastEventId = "" } = {}) {
  const controller = new AbortController();
  let last = lastEventId;
  (async () => {
    while (!controller.signal.aborted) {
      try {
        const url = new URL(path, location.origin);
        for (const [k, v] of Object.entries(query || {})) {
          for (const item of [].concat(v)) if (item) url.searchParams.append(k, item);
        }
        const response = await fetch(url, {
          headers: {
            Authorization: `Bearer ${token()}`,
            Accept: "text/event-stream",
            ...(last ? { "Last-Event-ID": last } : {}),
          },
          signal: controller.signal,
        });
        if (!response.ok) throw new ApiError(response.status, await response.json());
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const chunk = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let id = "", data = "", event = "message";
            for (const line of chunk.split("\n")) {
              if (line.startsWith("id: ")) id = line.slice(4);
              else if (line.startsWith("data: ")) data += line.slice(6);
              else if (line.startsWith("event: ")) event = line.slice(7);
            }
            if (!data) continue;
            if (id) last = id;
            onEvent(event, JSON.parse(data), id);
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && error.status < 500) {
          onEvent("error", { error: { message: error.message } }, "");
          return;
        }
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  })();
  return () => controller.abort();
}
