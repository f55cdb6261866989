// task-job console: a plain ES module, no dependencies, nothing fetched from elsewhere.
// It uses the public API only (docs/api.md). The token lives in this tab's sessionStorage and
// goes out as an Authorization header, never in a URL; streams are read with fetch() and
// parsed here (EventSource cannot send headers). Every page is kept current by one events
// stream (/api/v1/events?snapshot=2); nothing polls. Text from tasks is only ever set as text.

const TOKEN_KEY = "task-job-token";
const MAX_LINES = 5000;      // output lines kept in a task page; the full log is a download away
const SPARK_SECONDS = 300;   // the throughput sparkline's span
const GONE_KEEP_MS = 300000; // how long an executor that left stays listed
const FINISHED = new Set(["succeeded", "failed", "timeout", "killed", "cancelled", "lost", "rejected"]);
const STATUSES = ["running", "queued", "scheduled", "waiting", "unroutable", ...FINISHED];

// -- small helpers ----------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel, root = document) => root.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const badge = (status) => h("span", { class: `badge s-${status}`, "data-status": status }, status ?? "-");
const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleString() : "-");
function age(seconds) {
  if (typeof seconds !== "number") return "-";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
function chips(obj) {
  if (!obj || typeof obj !== "object") return "";
  return Object.entries(obj).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
}
function commandOf(row) {
  if (Array.isArray(row.command)) return row.command.join(" ");
  const t = row.message && row.message.task;
  if (t && typeof t.cmdline === "string") return [t.cmdline, ...(t.cmd_args || [])].join(" ");
  return "";
}

// -- session and API ----------------------------------------------------------------------

const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY) || ""; },
  set token(v) { if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY); },
  me: null,
  may(scope) { return !!this.me && (this.me.scopes.includes(scope) || this.me.scopes.includes("admin")); },
};

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch { data = null; }
  if (res.status === 401 && session.token) signOut("The token was refused; sign in again.");
  return { status: res.status, ok: res.ok, data };
}
const errorText = (r) => (r.data && r.data.error ? r.data.error.message : `HTTP ${r.status}`);

// Server-Sent Events over fetch: parsed here, resumed with Last-Event-ID after a drop.
// onEvent returns "stop" to end the stream. Returns nothing; abort `signal` to stop.
async function stream(path, onEvent, { signal, lastId = null, onState = () => {} } = {}) {
  let backoff = 500;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${session.token}`, Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = String(lastId);
      const res = await fetch(path, { headers, signal });
      if (!res.ok) {
        onState(false);
        if ([400, 401, 403, 404].includes(res.status)) { onEvent({ event: "http-error", status: res.status }); return; }
        throw new Error(`HTTP ${res.status}`);
      }
      onState(true);
      backoff = 500;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      let ev = { event: "message", data: [], id: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let start = 0;
        for (let nl = buf.indexOf("\n", start); nl >= 0; nl = buf.indexOf("\n", start)) {
          let line = buf.slice(start, nl);
          start = nl + 1;
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (ev.data.length) {
              if (ev.id !== null) lastId = ev.id;
              if (onEvent({ event: ev.event, data: ev.data.join("\n"), id: ev.id }) === "stop") {
                reader.cancel().catch(() => {});
                return;
              }
            }
            ev = { event: "message", data: [], id: null };
            continue;
          }
          if (line[0] === ":") continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val[0] === " ") val = val.slice(1);
          if (field === "event") ev.event = val;
          else if (field === "data") ev.data.push(val);
          else if (field === "id") ev.id = val;
        }
        buf = buf.slice(start);
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    onState(false);
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

// -- the one events stream and what it keeps -----------------------------------------------

const bus = new EventTarget();
const fleet = { executors: [], queues: null, at: 0, gone: new Map() };
const spark = new Map(); // second -> tasks finished in it
let events = null;

function startEvents() {
  if (events) events.abort();
  events = new AbortController();
  const live = $("#live");
  stream("/api/v1/events?snapshot=2", (ev) => {
    let data;
    try { data = JSON.parse(ev.data); } catch { return; }
    if (ev.event === "fleet") {
      const present = new Set(data.executors.map((e) => e.id));
      for (const e of fleet.executors) {
        if (!present.has(e.id) && !fleet.gone.has(e.id)) {
          fleet.gone.set(e.id, { ...e, status: e.status === "dead" ? "dead" : "stopped", goneAt: Date.now() });
        }
      }
      for (const id of present) fleet.gone.delete(id);
      for (const [id, e] of fleet.gone) if (Date.now() - e.goneAt > GONE_KEEP_MS) fleet.gone.delete(id);
      fleet.executors = data.executors;
      fleet.queues = data.queues;
      fleet.at = data.at;
      bus.dispatchEvent(new CustomEvent("fleet"));
    } else if (ev.event === "executor") {
      const id = data.instanceId;
      if (data.status === "DOWN") {
        const last = fleet.executors.find((e) => e.id === id) || { id };
        const dead = !!(data.metadata && data.metadata.taken_over_by);
        fleet.gone.set(id, { ...last, status: dead ? "dead" : "stopped", goneAt: Date.now(),
                             takenOverBy: dead ? data.metadata.taken_over_by : undefined });
        fleet.executors = fleet.executors.filter((e) => e.id !== id);
        bus.dispatchEvent(new CustomEvent("fleet"));
      }
    } else if (ev.event === "task") {
      if (FINISHED.has(data.status)) {
        const sec = Math.floor(data.at || Date.now() / 1000);
        spark.set(sec, (spark.get(sec) || 0) + 1);
      }
      bus.dispatchEvent(new CustomEvent("task", { detail: data }));
    }
  }, {
    signal: events.signal,
    onState: (on) => { live.textContent = on ? "live" : "reconnecting"; live.className = `live ${on ? "on" : "off"}`; },
  });
}

function listen(type, fn, cleanups) {
  bus.addEventListener(type, fn);
  cleanups.push(() => bus.removeEventListener(type, fn));
}

// -- pages ----------------------------------------------------------------------------------

function signInPage(view, message) {
  const input = h("input", { type: "password", name: "token", autocomplete: "off", placeholder: "API token", required: true });
  const error = h("p", { class: "error", id: "signin-error" }, message || "");
  const form = h("form", { class: "stack card", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "A token of the management API. It stays in this tab (sessionStorage) and is sent as an Authorization header."),
    h("label", {}, "Token", input), h("div", {}, h("button", { type: "submit" }, "Sign in")), error);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    session.token = input.value.trim();
    const r = await api("GET", "/api/v1/whoami");
    if (!r.ok) { session.token = ""; error.textContent = r.status === 401 ? "That token is not valid here." : errorText(r); return; }
    session.me = r.data;
    signedIn();
    location.hash = location.hash && !location.hash.startsWith("#/signin") ? location.hash : "#/fleet";
    route();
  });
  view.replaceChildren(form);
  input.focus();
}

function fleetPage(view, cleanups) {
  const body = h("tbody");
  const count = h("span", { class: "muted" });
  view.replaceChildren(h("h1", {}, "Fleet ", count),
    h("div", { class: "card scroll" }, h("table", { id: "executors" },
      h("thead", {}, h("tr", {}, ["Executor", "Host", "Labels", "Status", "Running / slots", "Heartbeat", "Version", ""]
        .map((t, i) => h("th", { class: [1, 6].includes(i) ? "hide-narrow" : "" }, t)))), body)));
  const action = async (id, what, button) => {
    button.disabled = true;
    const r = await api("POST", `/api/v1/executors/${encodeURIComponent(id)}/${what}`);
    if (!r.ok) { button.disabled = false; button.title = errorText(r); }
  };
  const render = () => {
    const rows = [...fleet.executors, ...fleet.gone.values()];
    count.textContent = `(${fleet.executors.length} registered)`;
    body.replaceChildren(...rows.map((e) => {
      const gone = fleet.gone.has(e.id) && !fleet.executors.some((x) => x.id === e.id);
      const buttons = [];
      if (!gone && session.may("admin") && e.status !== "dead") {
        const draining = e.status === "draining";
        const b = h("button", { class: "ghost", dataset: { action: draining ? "resume" : "drain" } }, draining ? "Resume" : "Drain");
        b.addEventListener("click", () => action(e.id, draining ? "resume" : "drain", b));
        buttons.push(b);
      }
      return h("tr", { class: gone ? "gone" : "", dataset: { executor: e.id } },
        h("td", {}, e.id), h("td", { class: "hide-narrow" }, e.host || "-"), h("td", { class: "wrap" }, chips(e.labels)),
        h("td", {}, badge(e.status), e.takenOverBy ? h("span", { class: "muted" }, ` taken over by ${e.takenOverBy}`) : ""),
        h("td", {}, gone ? "-" : `${e.running ?? 0} / ${e.slots ?? "?"}`),
        h("td", {}, gone ? "left" : age(e.heartbeat_age_s)), h("td", { class: "hide-narrow" }, e.version || "-"), h("td", {}, buttons));
    }));
  };
  render();
  listen("fleet", render, cleanups);
}

function sparkline(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, hgt = canvas.clientHeight || 48;
  canvas.width = w * dpr; canvas.height = hgt * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const now = Math.floor(Date.now() / 1000);
  const values = [];
  for (let s = now - SPARK_SECONDS + 1; s <= now; s++) values.push(spark.get(s) || 0);
  for (const s of spark.keys()) if (s < now - SPARK_SECONDS) spark.delete(s);
  const max = Math.max(1, ...values);
  ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent");
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (values.length - 1)) * w, y = hgt - 2 - (v / max) * (hgt - 4);
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
  return values.reduce((a, b) => a + b, 0);
}

function queuesPage(view, cleanups) {
  const stats = h("div", { class: "grid", id: "depths" });
  const canvas = h("canvas", { class: "spark", id: "spark" });
  const sparkNote = h("span", { class: "muted" });
  const perExec = h("tbody");
  const scheduled = h("tbody");
  const dead = h("tbody");
  const deadNote = h("p", { class: "muted" });
  view.replaceChildren(h("h1", {}, "Queues"), stats,
    h("div", { class: "card" }, h("div", {}, "Finished per second, last 5 minutes ", sparkNote), canvas),
    h("h2", {}, "Executors' lists"), h("div", { class: "card scroll" }, h("table", {}, h("thead", {}, h("tr", {},
      h("th", {}, "Executor"), h("th", {}, "Claimed (processing)"), h("th", {}, "Own queue (inbox)"))), perExec)),
    h("h2", {}, "Scheduled"), h("div", { class: "card scroll" }, h("table", { id: "scheduled" }, h("thead", {}, h("tr", {},
      h("th", {}, "Task"), h("th", {}, "Status"), h("th", {}, "Due"), h("th", {}, "Command"))), scheduled)),
    h("h2", {}, "Dead letters"), deadNote, h("div", { class: "card scroll" }, h("table", { id: "dead" }, h("thead", {}, h("tr", {},
      h("th", {}, "When"), h("th", {}, "Reason"), h("th", {}, "Message"), h("th", {}, ""))), dead)));
  const stat = (n, label, id) => h("div", { class: "card stat", id }, h("div", { class: "n" }, n ?? "-"), h("div", { class: "l" }, label));
  let lastDead = -1, lastScheduled = -1;
  const loadDead = async () => {
    const r = await api("GET", "/api/v1/dead?limit=100");
    if (!r.ok) { deadNote.textContent = errorText(r); return; }
    deadNote.textContent = r.data.dead.length ? "" : "None.";
    dead.replaceChildren(...r.data.dead.map((d) => {
      const cells = [h("td", {}, when(d.ts)), h("td", { class: "wrap" }, d.reason || "-"),
                     h("td", { class: "wrap" }, typeof d.message === "string" ? d.message : JSON.stringify(d.message ?? d.raw ?? ""))];
      const b = session.may("admin") ? h("button", { class: "ghost", dataset: { requeue: d.id } }, "Requeue") : "";
      if (b) b.addEventListener("click", async () => {
        b.disabled = true;
        const res = await api("POST", `/api/v1/dead/${d.id}/requeue`);
        b.textContent = res.ok ? "Requeued" : errorText(res);
        if (res.ok) loadDead();
      });
      return h("tr", { dataset: { dead: d.id } }, ...cells, h("td", {}, b));
    }));
  };
  const loadScheduled = async () => {
    const r = await api("GET", "/api/v1/tasks?status=scheduled&limit=50");
    if (!r.ok) return;
    scheduled.replaceChildren(...r.data.tasks.map((t) => h("tr", {},
      h("td", {}, h("a", { href: `#/task/${encodeURIComponent(t.id)}` }, t.id)), h("td", {}, badge(t.status)),
      h("td", {}, when(t.due)), h("td", { class: "wrap" }, commandOf(t)))));
  };
  const render = () => {
    const q = fleet.queues;
    if (q) {
      stats.replaceChildren(stat(q.queue.depth, `queued (${q.queue.name})`, "depth-queue"),
        stat(q.dispatch.depth, "dispatcher queue", "depth-dispatch"), stat(q.scheduled.depth, "scheduled", "depth-scheduled"),
        stat(q.dead.depth, "dead letters", "depth-dead"), stat(q.dispatch.unroutable, "unroutable", "depth-unroutable"));
      perExec.replaceChildren(...q.executors.map((e) => h("tr", {}, h("td", {}, e.executor), h("td", {}, e.processing), h("td", {}, e.inbox))));
      if (q.dead.depth !== lastDead) { lastDead = q.dead.depth; loadDead(); }
      if (q.scheduled.depth !== lastScheduled) { lastScheduled = q.scheduled.depth; loadScheduled(); }
    }
    const n = sparkline(canvas);
    sparkNote.textContent = `(${n} in all)`;
  };
  render();
  loadDead();
  listen("fleet", render, cleanups);
}

function tasksPage(view, cleanups, params) {
  const status = h("select", { name: "status" }, h("option", { value: "" }, "any status"),
    STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const executor = h("input", { name: "executor", placeholder: "executor", value: params.get("executor") || "" });
  const label = h("input", { name: "label", placeholder: "label k=v", value: params.get("label") || "" });
  const id = h("input", { name: "id", placeholder: "task id", value: params.get("id") || "" });
  const form = h("form", { class: "filters", id: "filters" }, h("label", {}, "Status", status), h("label", {}, "Executor", executor),
    h("label", {}, "Label", label), h("label", {}, "Id", id), h("button", { type: "submit" }, "Filter"));
  const body = h("tbody");
  const note = h("p", { class: "muted", id: "tasks-note" });
  const next = h("button", { class: "ghost", id: "next-page", disabled: true }, "Next page");
  const first = h("button", { class: "ghost", id: "first-page", disabled: true }, "First page");
  const pageNo = h("span", { class: "muted", id: "page-no" });
  view.replaceChildren(h("h1", {}, "Tasks"), form, note,
    h("div", { class: "card scroll" }, h("table", { id: "tasks" }, h("thead", {}, h("tr", {},
      ["Task", "Status", "Executor", "Command", "Started", "Finished", "Exit"].map((t, i) => h("th", { class: [3, 4].includes(i) ? "hide-narrow" : "" }, t)))), body)),
    h("div", { class: "pager" }, first, next, pageNo));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (id.value.trim()) { location.hash = `#/task/${encodeURIComponent(id.value.trim())}`; return; }
    const q = new URLSearchParams();
    for (const [k, v] of [["status", status.value], ["executor", executor.value.trim()], ["label", label.value.trim()]]) if (v) q.set(k, v);
    location.hash = `#/tasks?${q}`;
  });
  const query = new URLSearchParams({ limit: "100" });
  if (params.get("status")) query.set("status", params.get("status"));
  if (params.get("executor")) query.set("executor", params.get("executor"));
  const lab = params.get("label");
  if (lab && lab.includes("=")) query.set(`labels.${lab.slice(0, lab.indexOf("="))}`, lab.slice(lab.indexOf("=") + 1));
  const shown = new Map();
  let cursor = null, page = 1;
  const load = async (from) => {
    const q = new URLSearchParams(query);
    if (from) q.set("cursor", from);
    const t0 = performance.now();
    const r = await api("GET", `/api/v1/tasks?${q}`);
    if (!r.ok) { note.textContent = errorText(r); return; }
    shown.clear();
    const frag = document.createDocumentFragment();
    for (const t of r.data.tasks) {
      const cell = h("td", {}, badge(t.status));
      shown.set(t.id, cell);
      frag.append(h("tr", { dataset: { task: t.id } },
        h("td", {}, h("a", { href: `#/task/${encodeURIComponent(t.id)}` }, t.id)), cell, h("td", {}, t.executor || "-"),
        h("td", { class: "wrap hide-narrow" }, commandOf(t)), h("td", { class: "hide-narrow" }, when(t.started_at)),
        h("td", {}, when(t.finished_at)), h("td", {}, t.exit_code ?? "-")));
    }
    body.replaceChildren(frag);
    cursor = r.data.next;
    next.disabled = !cursor;
    first.disabled = page === 1;
    pageNo.textContent = `page ${page}`;
    note.textContent = r.data.tasks.length ? "" : "No tasks match.";
    view.dataset.loadedMs = String(Math.round(performance.now() - t0));
    view.dataset.page = String(page);
  };
  next.addEventListener("click", () => { if (cursor) { page += 1; load(cursor); } });
  first.addEventListener("click", () => { page = 1; load(null); });
  listen("task", (e) => {
    const cell = shown.get(e.detail.id);
    if (cell) cell.replaceChildren(badge(e.detail.status));
  }, cleanups);
  load(null);
}

// ANSI SGR colours as classes; every other escape sequence is dropped.
const ESC = /\x1b\[([0-9;?]*)([A-Za-z])/g;
function ansiSpans(text, state, cls) {
  const out = [];
  let last = 0;
  const push = (s) => {
    if (!s) return;
    const classes = [cls, state.fg && `a${state.fg}`, state.b && "a-b", state.d && "a-d", state.i && "a-i", state.u && "a-u"].filter(Boolean).join(" ");
    out.push(h("span", { class: classes }, s));
  };
  text.replace(ESC, (m, params, cmd, offset) => {
    push(text.slice(last, offset));
    last = offset + m.length;
    if (cmd !== "m") return m;
    for (const p of (params || "0").split(";").map(Number)) {
      if (p === 0) { state.fg = 0; state.b = state.d = state.i = state.u = false; }
      else if (p === 1) state.b = true; else if (p === 2) state.d = true; else if (p === 3) state.i = true;
      else if (p === 4) state.u = true; else if (p === 22) state.b = state.d = false; else if (p === 23) state.i = false;
      else if (p === 24) state.u = false; else if (p === 39) state.fg = 0;
      else if ((p >= 30 && p <= 37) || (p >= 90 && p <= 97)) state.fg = p;
    }
    return m;
  });
  push(text.slice(last));
  return out;
}

function taskPage(view, cleanups, taskId) {
  const abort = new AbortController();
  cleanups.push(() => abort.abort());
  const head = h("h1", {}, "Task ", h("span", { id: "task-id" }, taskId), " ", h("span", { id: "task-status" }));
  const details = h("dl", { class: "kv", id: "task-details" });
  const doneBox = h("pre", { class: "card wrap", id: "done-record", hidden: true });
  const out = h("pre", { class: "out", id: "output", tabindex: "0" });
  const note = h("span", { class: "muted", id: "output-note" });
  const follow = h("button", { class: "ghost", id: "follow", type: "button", "aria-pressed": "true" }, "Following");
  const download = h("button", { class: "ghost", id: "download", type: "button" }, "Full log");
  const kill = session.may("kill") ? h("button", { class: "danger", id: "kill", type: "button" }, "Kill") : null;
  const killNote = h("span", { class: "muted", id: "kill-note" });
  view.replaceChildren(head, h("div", { class: "card" }, details), h("div", { class: "toolbar" }, kill, killNote),
    h("h2", {}, "Output"), h("div", { class: "toolbar" }, follow, download, note), out, h("h2", {}, "Done record"), doneBox);

  let stick = true, lines = 0, dropped = 0, finished = false;
  const pending = [];
  const sgr = { out: {}, err: {}, note: {} };
  const setFollow = (on) => { stick = on; follow.textContent = on ? "Following" : "Paused"; follow.setAttribute("aria-pressed", String(on)); };
  // Only the reader's own scrolling (wheel, touch, keys, the scroll bar) pauses or resumes
  // following; the page's appends and trims move the view too, and must not.
  let userAt = -Infinity;
  for (const type of ["wheel", "touchmove", "keydown", "mousedown"]) {
    out.addEventListener(type, () => { userAt = performance.now(); }, { passive: true });
  }
  out.addEventListener("scroll", () => {
    if (performance.now() - userAt > 1000) return;
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    if (atEnd !== stick) setFollow(atEnd);
  });
  follow.addEventListener("click", () => { setFollow(!stick); if (stick) out.scrollTop = out.scrollHeight; });
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    if (!pending.length) return;
    // The newest MAX_LINES lines at most are turned into elements; the rest only counted.
    let budget = MAX_LINES, take = pending.length;
    while (take > 0 && budget > 0) { take -= 1; budget -= pending[take].n; }
    for (let i = 0; i < take; i++) dropped += pending[i].n;
    const frag = document.createDocumentFragment();
    let added = 0;
    for (let i = take; i < pending.length; i++) {
      const p = pending[i];
      const block = h("span", { dataset: { n: p.n } }, ansiSpans(p.text, sgr[p.cls], p.cls));
      frag.append(block);
      added += p.n;
    }
    pending.length = 0;
    out.append(frag);
    lines += added;
    while (lines > MAX_LINES && out.firstChild) {
      const n = Number(out.firstChild.dataset ? out.firstChild.dataset.n || 0 : 0);
      out.firstChild.remove();
      lines -= n; dropped += n;
    }
    note.textContent = dropped ? `${dropped.toLocaleString()} earlier lines are not kept in the page; the full log has them.` : "";
    if (stick) out.scrollTop = out.scrollHeight;
  };
  const add = (text, cls) => {
    let n = 0;
    for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) n++;
    pending.push({ text, cls, n: Math.max(n, 1) });
    if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
  };

  const dt = (k, v) => [h("dt", {}, k), h("dd", { dataset: { field: k } }, v)];
  const showState = (t) => {
    const done = t.done || {};
    const status = done.status || t.status;
    $("#task-status").replaceChildren(badge(status));
    details.replaceChildren(...dt("command", commandOf(t) || "-"), ...dt("executor", t.executor || done.executor || "-"),
      ...dt("attempt", t.attempt ?? "-"), ...dt("submitted by", t.submitted_by || done.submitted_by || "-"),
      ...dt("claimed", when(t.claimed_at)), ...dt("started", when(t.started_at ?? done.started_at)),
      ...dt("finished", when(t.finished_at ?? done.finished_at)),
      ...dt("duration", typeof done.duration === "number" ? `${done.duration.toFixed(3)} s` : "-"),
      ...dt("exit code", t.exit_code ?? done.exit_code ?? "-"), ...dt("signal", done.signal ?? "-"),
      ...dt("usage", done.usage ? Object.entries(done.usage).map(([k, v]) => `${k} ${v}`).join(", ") : "-"));
    if (t.done) { doneBox.hidden = false; doneBox.textContent = JSON.stringify(t.done, null, 2); }
    if (kill) kill.hidden = FINISHED.has(status);
  };
  if (kill) kill.addEventListener("click", async () => {
    kill.disabled = true;
    const r = await api("POST", `/api/v1/tasks/${encodeURIComponent(taskId)}/kill`);
    killNote.textContent = r.ok ? "kill sent" : errorText(r);
    if (!r.ok) kill.disabled = false;
  });
  download.addEventListener("click", async () => {
    download.disabled = true;
    const r = await api("GET", `/api/v1/tasks/${encodeURIComponent(taskId)}/logs`);
    download.disabled = false;
    if (!r.ok) { note.textContent = errorText(r); return; }
    const text = r.data.records.filter((x) => x.msg_type === "stdout" || x.msg_type === "stderr").map((x) => x.data).join("");
    const url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
    const a = h("a", { href: url, download: `${taskId}.log` });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
  let known = false;
  const refresh = async () => {
    const r = await api("GET", `/api/v1/tasks/${encodeURIComponent(taskId)}`);
    if (r.ok) { known = true; showState(r.data); return; }
    if (r.status === 404) {
      // Not claimed yet (queued, parked) or never seen: its records are followed anyway.
      $("#task-status").replaceChildren(badge("queued"));
      details.replaceChildren(h("dt", {}, "state"), h("dd", {}, "not claimed yet (queued or parked), or no such task"));
    } else details.replaceChildren(h("dd", { class: "error" }, errorText(r)));
  };
  refresh().then(() => stream(`/api/v1/tasks/${encodeURIComponent(taskId)}/logs?follow=1`, (ev) => {
    if (ev.event === "http-error") { note.textContent = `output unavailable (HTTP ${ev.status})`; return "stop"; }
    let rec;
    try { rec = JSON.parse(ev.data); } catch { return; }
    if (!known) { known = true; refresh(); }
    if (rec.msg_type === "stdout") add(rec.data, "out");
    else if (rec.msg_type === "stderr") add(rec.data, "err");
    else if (rec.msg_type === "retry") add(`[attempt ${rec.attempt} ended ${rec.status}; retrying]\n`, "note");
    else if (rec.msg_type === "done") {
      finished = true;
      refresh();
      return "stop";
    }
  }, { signal: abort.signal }));
  listen("task", (e) => {
    if (e.detail.id !== taskId || finished) return;
    if (!known) refresh();
    else if (e.detail.status === "running") $("#task-status").replaceChildren(badge("running"));
  }, cleanups);
}

function submitPage(view) {
  const field = (name, label, input, hint) => h("label", {}, label, input, hint ? h("span", { class: "muted" }, hint) : "",
    h("span", { class: "field-error", dataset: { for: name } }));
  const cmd = h("input", { name: "cmdline", placeholder: "hello.sh", required: true });
  const args = h("textarea", { name: "args", placeholder: "one argument per line, passed verbatim" });
  const env = h("textarea", { name: "env", placeholder: "KEY=value, one per line" });
  const timeout = h("input", { name: "timeout", placeholder: "seconds", inputmode: "decimal" });
  const id = h("input", { name: "id", placeholder: "(a random id)" });
  const general = h("p", { class: "error", id: "submit-error" });
  const form = h("form", { class: "stack card", id: "submit" },
    field("task.cmdline", "Command line (inside cmd_dir; never run through a shell)", cmd),
    field("task.cmd_args", "Arguments", args), field("task.env", "Environment", env),
    field("task.timeout", "Timeout", timeout), field("id", "Id", id),
    h("div", {}, h("button", { type: "submit" }, "Submit")), general);
  view.replaceChildren(h("h1", {}, "Submit a task"), form);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    general.textContent = "";
    const task = { cmdline: cmd.value.trim() };
    const argv = args.value.split("\n").filter((l) => l !== "");
    if (argv.length) task.cmd_args = argv;
    const vars = {};
    for (const line of env.value.split("\n").map((l) => l.trim()).filter(Boolean)) {
      const eq = line.indexOf("=");
      if (eq <= 0) { form.querySelector('[data-for="task.env"]').textContent = `not KEY=value: ${line}`; return; }
      vars[line.slice(0, eq)] = line.slice(eq + 1);
    }
    if (Object.keys(vars).length) task.env = vars;
    if (timeout.value.trim()) task.timeout = Number.isNaN(Number(timeout.value)) ? timeout.value.trim() : Number(timeout.value);
    const body = { task };
    if (id.value.trim()) body.id = id.value.trim();
    const r = await api("POST", "/api/v1/tasks", body);
    if (r.ok) { location.hash = `#/task/${encodeURIComponent(r.data.id)}`; return; }
    const err = r.data && r.data.error;
    const slot = err && err.field && (form.querySelector(`[data-for="${CSS.escape(err.field)}"]`) ||
      form.querySelector(`[data-for="${CSS.escape(err.field.split(".").slice(0, 2).join("."))}"]`));
    if (slot) slot.textContent = err.message; else general.textContent = err ? err.message : `HTTP ${r.status}`;
  });
  cmd.focus();
}

// -- shell ------------------------------------------------------------------------------

let cleanups = [];

function signedIn() {
  $("#nav").hidden = false;
  $("#signout").hidden = false;
  $("#who").textContent = `${session.me.name} (${session.me.scopes.join(", ")})`;
  for (const a of document.querySelectorAll("nav a[data-scope]")) a.hidden = !session.may(a.dataset.scope);
  startEvents();
}

function signOut(message) {
  session.token = "";
  session.me = null;
  if (events) events.abort();
  $("#nav").hidden = true;
  $("#signout").hidden = true;
  $("#who").textContent = "";
  for (const c of cleanups) c();
  cleanups = [];
  signInPage($("#view"), message);
}

function route() {
  for (const c of cleanups) c();
  cleanups = [];
  const view = $("#view");
  delete view.dataset.loadedMs;
  if (!session.token || !session.me) { signInPage(view); return; }
  const [path, query] = (location.hash.slice(1) || "/fleet").split("?");
  const params = new URLSearchParams(query || "");
  const page = path.split("/")[1] || "fleet";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (page === "task") taskPage(view, cleanups, decodeURIComponent(path.slice("/task/".length)));
  else if (page === "queues") queuesPage(view, cleanups);
  else if (page === "tasks") tasksPage(view, cleanups, params);
  else if (page === "submit" && session.may("submit")) submitPage(view);
  else fleetPage(view, cleanups);
}

function theme() {
  const saved = localStorage.getItem("task-job-theme");
  if (saved) document.documentElement.dataset.theme = saved;
  $("#theme").addEventListener("click", () => {
    const dark = matchMedia("(prefers-color-scheme: dark)").matches;
    const current = document.documentElement.dataset.theme || (dark ? "dark" : "light");
    const next = current === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("task-job-theme", next);
    bus.dispatchEvent(new CustomEvent("fleet"));
  });
}

async function main() {
  theme();
  $("#signout").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", route);
  if (session.token) {
    const r = await api("GET", "/api/v1/whoami");
    if (r.ok) { session.me = r.data; signedIn(); } else session.token = "";
  }
  route();
}

main();
