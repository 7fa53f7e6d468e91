// The operator view: every owner's jobs, a page at a time, for the holder of the service
// key. The key lives in sessionStorage (this tab only) and travels only as a bearer
// header, never in a URL. The rows on screen are refreshed by one request every
// REFRESH_MS, whatever their number; actions on a job act as its owner (X-Jobwire-Owner).
// Everything shown is set as text, never as markup: owners, tasks and errors are users'.

const KEY = "jobwire.serviceKey";
const REFRESH_MS = 3000;
const MAX_LIMIT = 500; // the server's most rows per request
const STATUSES = ["queued", "running", "completed", "failed", "cancelled"];

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const state = { rows: [], next: null, query: {}, limit: 25, epoch: 0, ticking: false };
const notes = new Map(); // job id -> what an action left to say about it ("retried as …")

// Refreshes and "older jobs" run one at a time, so neither overwrites the other's rows
// with an answer to an older question; a change of filters bumps `epoch` to drop those.
let chain = Promise.resolve();
function serial(fn) {
  const run = chain.then(fn);
  chain = run.catch(() => {});
  return run;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The server's error body as a sentence: a detail string, or FastAPI's list of
// {loc, msg}, named by the field it is about.
function reason(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`).join("; ");
  }
  return `the server answered ${status}`;
}

async function api(path, { method = "GET", params = {}, owner = null } = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { Authorization: `Bearer ${key}` };
  if (owner) headers["X-Jobwire-Owner"] = owner;
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v != null));
  let response;
  try {
    response = await fetch(path + (query.toString() ? `?${query}` : ""), { method, headers });
  } catch {
    throw new ApiError(0, "cannot reach the server: is it running? Retrying…");
  }
  if (response.status === 204) return { body: null, response };
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    let text = reason(response.status, body);
    if (response.status === 401 || response.status === 403) {
      text = `the service key was refused (${text}): enter the server's JOBWIRE_SERVICE_KEY`;
    } else if (response.status >= 500) {
      text = `the server failed (${response.status}): ${text}`;
    }
    throw new ApiError(response.status, text);
  }
  return { body, response };
}

function showError(error) {
  const el = $("error");
  el.textContent = error ? error.message : "";
  el.hidden = !error;
  if (error && (error.status === 401 || error.status === 403)) askKey();
}

function setLive(stateName, text) {
  const el = $("live");
  el.dataset.state = stateName;
  el.textContent = text;
}

function askKey() {
  sessionStorage.removeItem(KEY);
  state.epoch++; // drop whatever is in flight with the old key
  $("key-form").hidden = false;
  $("main").hidden = true;
  $("forget-key").hidden = true;
  setLive("off", "not connected");
}

const shortId = (id) => id.slice(0, 8);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function cell(tr, name, text, title) {
  let td = tr.querySelector(`td.${name}`);
  if (!td) {
    td = document.createElement("td");
    td.className = name;
    tr.append(td);
  }
  if (td.textContent !== text) td.textContent = text;
  if (title !== undefined) td.title = title;
  return td;
}

function actionButton(label, testid, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.testid = testid;
  b.addEventListener("click", onClick);
  return b;
}

function renderActions(td, job) {
  const active = job.status === "queued" || job.status === "running";
  const buttons = [];
  if (active && !job.cancel_requested) {
    buttons.push(actionButton("Cancel", "cancel", () => act(job, "cancel")));
  }
  if (job.status === "failed" || job.status === "cancelled") {
    buttons.push(actionButton("Retry", "retry", () => act(job, "retry")));
  }
  if (!active) buttons.push(actionButton("Delete", "delete", () => act(job, "delete")));
  const note = document.createElement("span");
  note.className = "note";
  note.dataset.testid = "note";
  note.textContent = notes.get(job.id) || "";
  td.replaceChildren(...buttons, note);
}

const rowsById = new Map();

function renderRow(job) {
  let tr = rowsById.get(job.id);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.testid = "row";
    tr.dataset.jobId = job.id;
    rowsById.set(job.id, tr);
  }
  cell(tr, "id", shortId(job.id), job.id);
  cell(tr, "owner", job.owner);
  cell(tr, "task", job.task);
  const status = job.cancel_requested && job.status === "running" ? "cancelling" : job.status;
  cell(tr, "status", status).dataset.status = job.status;
  const p = job.progress;
  cell(tr, "progress", p.total ? `${p.done + p.failed}/${p.total}${p.failed ? ` (${p.failed} failed)` : ""}` : "");
  cell(tr, "created", when(job.created_at), job.created_at);
  cell(tr, "error", job.error || "");
  // Rebuilt only when something it depends on changed, so a refresh never swaps a
  // button out from under the pointer.
  const shape = `${job.status}|${job.cancel_requested}|${notes.get(job.id) || ""}`;
  if (tr.dataset.shape !== shape) {
    tr.dataset.shape = shape;
    renderActions(cell(tr, "actions", ""), job);
  }
  tr.dataset.status = job.status;
  tr.dataset.owner = job.owner;
  return tr;
}

function render() {
  const trs = state.rows.map(renderRow);
  const shown = new Set(state.rows.map((j) => j.id));
  for (const id of rowsById.keys()) if (!shown.has(id)) rowsById.delete(id);
  $("rows").replaceChildren(...trs);
  $("empty").hidden = state.rows.length > 0;
  $("older").hidden = state.next === null;
}

function renderCounts(counts) {
  const items = STATUSES.map((s) => {
    const li = document.createElement("li");
    li.dataset.status = s;
    li.dataset.count = String(counts[s]);
    li.textContent = `${s}: ${counts[s]}`;
    return li;
  });
  $("counts").replaceChildren(...items);
}

async function fetchPage(limit, before) {
  const { body, response } = await api("/api/jobs", {
    params: { ...state.query, limit, before } });
  return { jobs: body, next: response.headers.get("X-Next-Cursor") };
}

// Reload what is on screen, newest first, in one request (and the counts in another).
// Past MAX_LIMIT rows only the newest MAX_LIMIT are refreshed, in place.
async function refresh() {
  const epoch = state.epoch;
  const limit = Math.min(Math.max(state.rows.length, state.limit), MAX_LIMIT);
  const [page, counts] = await Promise.all([
    fetchPage(limit, null),
    api("/api/admin/counts", { params: { owner: state.query.owner } })]);
  if (epoch !== state.epoch) return;
  if (state.rows.length <= MAX_LIMIT) {
    state.rows = page.jobs;
    state.next = page.next;
  } else {
    const fresh = new Map(page.jobs.map((j) => [j.id, j]));
    state.rows = state.rows.map((j) => fresh.get(j.id) || j);
  }
  renderCounts(counts.body);
  render();
}

async function older() {
  const epoch = state.epoch;
  $("older").disabled = true;
  await serial(async () => {
    const page = await fetchPage(state.limit, state.next);
    if (epoch !== state.epoch) return;
    const known = new Set(state.rows.map((j) => j.id));
    state.rows = state.rows.concat(page.jobs.filter((j) => !known.has(j.id)));
    state.next = page.next;
    render();
    showError(null);
  }).catch(showError);
  $("older").disabled = false;
}

const CONFIRM = {
  cancel: (j) => `Cancel job ${shortId(j.id)} (${j.task}) of ${j.owner}?`,
  retry: (j) => `Submit job ${shortId(j.id)} (${j.task}) of ${j.owner} again, as a new job?`,
  delete: (j) => `Delete job ${shortId(j.id)} (${j.task}) of ${j.owner} and its history? This cannot be undone.`,
};

async function act(job, action) {
  if (!window.confirm(CONFIRM[action](job))) return;
  try {
    if (action === "cancel") {
      await api(`/api/jobs/${job.id}/cancel`, { method: "POST", owner: job.owner });
    } else if (action === "delete") {
      await api(`/api/jobs/${job.id}`, { method: "DELETE", owner: job.owner });
    } else {
      const { body } = await api(`/api/admin/jobs/${job.id}/retry`, { method: "POST" });
      notes.set(job.id, `retried as ${shortId(body.job.id)}${body.created ? "" : " (already active)"}`);
    }
    showError(null);
  } catch (error) {
    showError(error);
  }
  await tick(true);
}

function readFilters() {
  const form = new FormData($("filters"));
  const seconds = (v) => (v ? String(new Date(v).getTime() / 1000) : "");
  state.limit = Math.min(Math.max(Number(form.get("limit")) || 25, 1), MAX_LIMIT);
  state.query = {
    owner: form.get("owner").trim(), status: form.get("status"), task: form.get("task").trim(),
    since: seconds(form.get("since")), until: seconds(form.get("until")) };
}

// `force`: even while a timer's refresh runs (it may be of filters no longer shown).
async function tick(force = false) {
  if ((state.ticking && !force) || !sessionStorage.getItem(KEY)) return;
  state.ticking = true;
  try {
    await serial(refresh);
    setLive("on", `live · updated ${new Date().toLocaleTimeString()}`);
    showError(null);
  } catch (error) {
    setLive("failing", "updates failing");
    showError(error);
  } finally {
    state.ticking = false;
  }
}

async function restart() {
  state.epoch++;
  state.rows = [];
  state.next = null;
  readFilters();
  render();
  await tick(true);
}

function start() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("key-form").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = false;
    restart();
  });
  $("forget-key").addEventListener("click", () => {
    askKey();
    state.rows = [];
    render();
  });
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    restart();
  });
  $("older").addEventListener("click", older);
  setInterval(tick, REFRESH_MS);
  if (sessionStorage.getItem(KEY)) {
    $("main").hidden = false;
    $("forget-key").hidden = false;
    restart();
  } else {
    askKey();
  }
  document.body.dataset.ready = "true";
}

start();
